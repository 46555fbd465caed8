#!/usr/bin/env bash
# Install a real Label Studio (the interop tests' peer) into its OWN virtual environment.
#
# Label Studio pins many exact versions, so it never goes into the project's venv: the tests
# run it as a subprocess (`$CORELOOP_LS_VENV/bin/label-studio`) and drive it with the SDK
# through `$CORELOOP_LS_VENV/bin/python`. Idempotent: does nothing when both pinned versions
# are already installed. See shared/design/ENVIRONMENT.md ("A real Label Studio as a test peer").
set -euo pipefail
cd "$(dirname "$0")/.."

LS_VERSION="1.23.2"
SDK_VERSION="2.1.2"
VENV="${CORELOOP_LS_VENV:-.ls-venv}"
PYTHON="${PYTHON:-python3}"

installed() {
  "$VENV/bin/python" - "$LS_VERSION" "$SDK_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if (version("label-studio"), version("label-studio-sdk")) == tuple(sys.argv[1:3]) else 1)
PY
}

if [ -x "$VENV/bin/python" ] && [ -x "$VENV/bin/label-studio" ] && installed; then
  echo "Label Studio $LS_VERSION already installed in $VENV"
  exit 0
fi

echo "installing Label Studio $LS_VERSION (SDK $SDK_VERSION) into $VENV"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
# pip's warnings about this machine's local index folders are noise; the check below is the
# verdict (a failed install leaves the versions missing).
"$VENV/bin/python" -m pip install -q "label-studio==$LS_VERSION" "label-studio-sdk==$SDK_VERSION" \
  2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
if ! installed; then
  echo "Label Studio $LS_VERSION / SDK $SDK_VERSION did not install into $VENV" >&2
  exit 1
fi
echo "Label Studio $LS_VERSION installed in $VENV"
