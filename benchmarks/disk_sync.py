"""How long this machine's disk takes to make a small write durable: what a commit waits for
when the database syncs its log (PostgreSQL by default, SQLite with
``CORELOOP_SQLITE_SYNCHRONOUS=full``).

It appends 8 KiB (one WAL page of PostgreSQL) to a file in ``--dir`` and calls ``fdatasync``,
``--rate`` times a second (0: back to back) for ``--seconds``, and prints the latency
percentiles and the stalls (syncs over ``--stall-ms``) as one JSON line. Run it on the file
system the database writes to::

    .venv/bin/python -m benchmarks.disk_sync --dir /var/lib/postgresql --seconds 60 --rate 700

(700 a second: about the commits of the load benchmark's 32 annotators on PostgreSQL, two per
cycle; a cloud disk may throttle a writer that syncs back to back.)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

PAGE = b"\0" * 8192


def measure(
    directory: Path, seconds: float, stall_ms: float, rate: float = 0.0
) -> dict[str, object]:
    latencies: list[float] = []
    gap = 1.0 / rate if rate > 0 else 0.0
    with tempfile.NamedTemporaryFile(dir=directory, prefix="coreloop-disk-sync-") as f:
        fd = f.fileno()
        begin = time.monotonic()
        end = begin + seconds
        while (now := time.monotonic()) < end:
            due = begin + len(latencies) * gap  # a fixed timetable: late syncs don't pile up
            if due > now:
                time.sleep(due - now)
            os.write(fd, PAGE)
            start = time.perf_counter()
            os.fdatasync(fd)
            latencies.append(time.perf_counter() - start)
            if f.tell() > 64 * 1024 * 1024:  # a WAL segment's size, then start over
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
    ms = np.array(latencies) * 1000
    stalls = ms[ms > stall_ms]
    return {
        "dir": str(directory),
        "seconds": seconds,
        "rate": rate,
        "syncs": len(ms),
        "per_s": round(len(ms) / seconds, 1),
        "ms": {
            "p50": round(float(np.percentile(ms, 50)), 3),
            "p99": round(float(np.percentile(ms, 99)), 3),
            "p999": round(float(np.percentile(ms, 99.9)), 3),
            "max": round(float(ms.max()), 1),
        },
        "stall_ms": stall_ms,
        "stalls": len(stalls),
        "stalled_s": round(float(stalls.sum()) / 1000, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=0.0, help="syncs a second (0: back to back)")
    parser.add_argument("--stall-ms", type=float, default=50.0, help="a sync this slow is a stall")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.rate < 0:
        parser.error("--seconds must be > 0 and --rate >= 0")
    if not args.dir.is_dir():
        parser.error(f"--dir {args.dir} is not a directory")
    print(json.dumps(measure(args.dir, args.seconds, args.stall_ms, args.rate)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
