"""How long this machine's disk takes to make a small write durable: what a commit waits for
when the database syncs its log (PostgreSQL by default, SQLite with
``CORELOOP_SQLITE_SYNCHRONOUS=full``).

As PostgreSQL does with its WAL, it writes 8 KiB (one WAL page) at a time into a file of
``--segment-mb`` (16, PostgreSQL's WAL segment) made beforehand, from its start to its end and
round again, and calls ``fdatasync`` after each write: ``--rate`` times a second on a fixed
timetable (0: back to back) for ``--seconds``. Syncs held up by a stall are then made back to
back, as commits queued behind it would be. It prints the latency percentiles and the stalls
(syncs over ``--stall-ms``) as one JSON line. Run it in a directory on the file system of the
database's files (the database's own directory is often not writable by others)::

    .venv/bin/python -m benchmarks.disk_sync --dir DIR --seconds 60 --rate 700

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

PAGE_BYTES = 8192


def measure(
    directory: Path,
    seconds: float,
    stall_ms: float,
    rate: float = 0.0,
    segment_bytes: int = 16 * 1024 * 1024,
) -> dict[str, object]:
    latencies: list[float] = []
    gap = 1.0 / rate if rate > 0 else 0.0
    page = os.urandom(PAGE_BYTES)
    pages = max(1, segment_bytes // PAGE_BYTES)
    with tempfile.NamedTemporaryFile(dir=directory, prefix="coreloop-disk-sync-") as f:
        fd = f.fileno()
        for i in range(pages):  # the segment, written and synced once before the clock
            os.pwrite(fd, bytes(PAGE_BYTES), i * PAGE_BYTES)
        os.fsync(fd)
        begin = time.monotonic()
        end = begin + seconds
        while (now := time.monotonic()) < end:
            due = begin + len(latencies) * gap
            if due >= end:
                break
            if due > now:
                time.sleep(due - now)
            os.pwrite(fd, page, (len(latencies) % pages) * PAGE_BYTES)
            start = time.perf_counter()
            os.fdatasync(fd)
            latencies.append(time.perf_counter() - start)
    ms = np.array(latencies) * 1000
    stalls = ms[ms > stall_ms]
    return {
        "dir": str(directory),
        "seconds": seconds,
        "rate": rate,
        "segment_bytes": pages * PAGE_BYTES,
        "syncs": len(ms),
        "per_s": round(len(ms) / seconds, 1),
        "ms": {
            "p50": round(float(np.percentile(ms, 50)), 3),
            "p99": round(float(np.percentile(ms, 99)), 3),
            "p999": round(float(np.percentile(ms, 99.9)), 3),
            "max": round(float(ms.max()), 3),
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
    parser.add_argument("--segment-mb", type=float, default=16.0, help="the file written round")
    parser.add_argument("--stall-ms", type=float, default=50.0, help="a sync this slow is a stall")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.rate < 0 or args.segment_mb <= 0:
        parser.error("--seconds and --segment-mb must be > 0, --rate >= 0")
    if not args.dir.is_dir():
        parser.error(f"--dir {args.dir} is not a directory")
    print(
        json.dumps(
            measure(
                args.dir, args.seconds, args.stall_ms, args.rate, int(args.segment_mb * 1024 * 1024)
            )
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
