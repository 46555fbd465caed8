"""Local file storage under ``settings.storage_dir``: keys, never client file names.

Keys are built by the server (``images/<project>/<sha256>.<ext>``); a key that could leave
the root (absolute, ``..``, backslashes) is refused. Writes go to a temporary file in the
same directory, are fsynced, then renamed into place, so a crash never leaves half a file.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

TEMP_PREFIX = ".tmp-"  # put_bytes' temporary files, renamed into place once written
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-][A-Za-z0-9_.\-]*)*$")


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX: the directory entry itself)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Storage:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def path(self, key: str) -> Path:
        """The file behind ``key``; raises ``ValueError`` for a key that is not ours."""
        if not _KEY_RE.match(key) or ".." in key.split("/"):
            raise ValueError(f"invalid storage key: {key!r}")
        full = (self.root / key).resolve()
        if self.root not in full.parents:
            raise ValueError(f"invalid storage key: {key!r}")
        return full

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def put_bytes(self, key: str, data: bytes) -> str:
        """Write ``data`` atomically under ``key``; returns its sha256 hex digest."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=TEMP_PREFIX, suffix=target.suffix)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return hashlib.sha256(data).hexdigest()

    def read_bytes(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def iter_chunks(self, key: str, chunk_size: int = 1 << 16) -> Iterator[bytes]:
        with self.path(key).open("rb") as fh:
            while chunk := fh.read(chunk_size):
                yield chunk

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def sweep_temp_files(self, older_than: float) -> list[Path]:
        """Delete the temporary files of writes that never finished (a process killed between
        writing and renaming), last modified before ``older_than`` (a ``time.time()``), so that
        another process's write in progress is left alone. Returns the files deleted."""
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        for path in self.root.rglob(f"{TEMP_PREFIX}*"):
            try:
                if path.is_file() and path.stat().st_mtime < older_than:
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:  # gone meanwhile (its write finished, or another sweep)
                continue
        return removed
