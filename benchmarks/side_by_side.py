"""Two versions of the server under the same load at the same moment: an A/B that the machine's
drift does not decide.

On a shared machine one run can be twice as fast as the next (the same code, minutes apart), so
two versions measured one after the other compare the moments more than the code. This runs
``benchmarks.load`` from this checkout and from ``--base`` (another checkout: a ``git
worktree`` of an older commit, say) as two processes started together, each with its own
server and its own database, and reports each run's cycles/s and CPU per cycle, and this
checkout's ratios to the base's. Both halves share the cores, so each figure is about half of
what one run alone gives; the ratios are the result.

    git worktree add /tmp/base <commit>
    .venv/bin/python -m benchmarks.side_by_side --base /tmp/base --runs 3 -- \\
        --db postgresql --annotators 16 --serve --rate 0

Both halves must load their servers with the same HTTP client. A base older than
``benchmarks.lean_http`` has httpx's only (and no ``--client``): against such a base this
checkout's half runs ``--client httpx`` too, and the base is given no ``--client`` (naming
another client is refused). Each run's JSON says which client each half ran.

It prints one JSON line per run on stdout and a summary on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]
_CPU_KEYS = ("server", "db", "client")


def _start(checkout: Path, load_args: list[str]) -> subprocess.Popen[str]:
    """``benchmarks.load`` with ``load_args``, run from ``checkout`` (its code, this Python)."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.load", *load_args],
        cwd=checkout,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _report(name: str, process: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the {name} run failed ({process.returncode}):\n{err[-2000:]}")
    return dict(json.loads(out.strip().splitlines()[-1]))


def _ratio(new: Any, base: Any) -> float | None:
    if not isinstance(new, (int, float)) or not isinstance(base, (int, float)) or base == 0:
        return None  # "n/a" (no database CPU on SQLite)
    return round(new / base, 3)


def _has_client_choice(checkout: Path) -> bool:
    """Whether ``checkout``'s load benchmark takes ``--client`` (it has the lean client)."""
    return "--client" in (checkout / "benchmarks" / "load.py").read_text(encoding="utf-8")


def _without_client(load_args: list[str]) -> tuple[list[str], str | None]:
    """``load_args`` without their ``--client X`` (or ``--client=X``), and X (None if absent)."""
    rest: list[str] = []
    client = None
    args = iter(load_args)
    for arg in args:
        if arg == "--client":
            client = next(args, None)
        elif arg.startswith("--client="):
            client = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return rest, client


def _both_args(base: Path, load_args: list[str]) -> tuple[list[str], list[str]]:
    """This checkout's arguments and the base's: ``load_args`` for both, unless the base has
    httpx's client only: then this half runs it too, and the base is given no ``--client``
    (a client other than httpx named for both is refused: the halves would differ)."""
    if _has_client_choice(base):
        return load_args, load_args
    rest, client = _without_client(load_args)
    if client not in (None, "httpx"):
        raise ValueError(
            f"the base has httpx's client only, so both halves run httpx, not --client {client}"
        )
    return [*rest, "--client", "httpx"], rest


def one_run(base: Path, load_args: list[str]) -> dict[str, Any]:
    """Both versions at once; this checkout's figures, the base's, and their ratios."""
    new_args, base_args = _both_args(base, load_args)
    processes = {"new": _start(HERE, new_args), "base": _start(base, base_args)}
    reports = {name: _report(name, process) for name, process in processes.items()}
    new, old = reports["new"], reports["base"]
    ratios = {"cycles_per_s": _ratio(new["cycles_per_s"], old["cycles_per_s"])}
    for key in _CPU_KEYS:
        ratios[f"cpu_ms_per_cycle.{key}"] = _ratio(
            new["cpu_ms_per_cycle"][key], old["cpu_ms_per_cycle"][key]
        )
    checks = {
        name: {k: r[k] for k in ("errors", "double_leases", "labels_lost")}
        for name, r in reports.items()
    }
    return {
        "new": {"cycles_per_s": new["cycles_per_s"], "cpu_ms_per_cycle": new["cpu_ms_per_cycle"]},
        "base": {"cycles_per_s": old["cycles_per_s"], "cpu_ms_per_cycle": old["cpu_ms_per_cycle"]},
        "client": {"new": new.get("client", "httpx"), "base": old.get("client", "httpx")},
        "ratio": ratios,
        "checks": checks,
        "load_average": new["load_average"],
    }


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    load_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="the other checkout")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(own)
    if not (args.base / "benchmarks" / "load.py").is_file():
        parser.error(f"{args.base} is not a checkout of this project (no benchmarks/load.py)")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    try:
        _both_args(args.base, load_args)
    except ValueError as exc:
        parser.error(str(exc))
    return args, load_args


def main(argv: list[str] | None = None) -> int:
    args, load_args = parse_args(argv)
    ratios: list[float] = []
    for run in range(1, args.runs + 1):
        result = one_run(args.base.resolve(), load_args)
        print(json.dumps(result), flush=True)
        ratio = result["ratio"]["cycles_per_s"]
        ratios.append(ratio)
        print(
            f"run {run}: {result['new']['cycles_per_s']:.0f} against "
            f"{result['base']['cycles_per_s']:.0f} cycles/s (x{ratio}); CPU per cycle, "
            f"new/base: server x{result['ratio']['cpu_ms_per_cycle.server']}, "
            f"database x{result['ratio']['cpu_ms_per_cycle.db']}; load {result['load_average']}",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"cycles/s, this checkout against the base: median x{statistics.median(ratios)} "
        f"over {len(ratios)} runs (x{min(ratios)}-x{max(ratios)})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
