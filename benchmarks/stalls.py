"""Lay a server's slow system calls beside the load benchmark's requests: did the server answer
anything while it waited?

Input: the load benchmark's ``--trace`` file (each measured request's start on CLOCK_MONOTONIC
and its duration) and the output of ``perf trace -T`` on the API process (each call's start
in milliseconds on the same clock, and its duration). For each call it prints how many
responses came back during it, how many requests were in flight all through it, and the
slowest request that overlapped it, as one JSON line per call::

    .venv/bin/python -m benchmarks.load --db sqlite --annotators 32 --serve --trace /tmp/r.jsonl &
    sleep 5; API=$(pgrep -f 'coreloop.cli serve' | head -1)
    perf trace -T --duration 20 -e fsync,fdatasync -p "$API" -o /tmp/s.txt
    .venv/bin/python -m benchmarks.stalls --requests /tmp/r.jsonl --calls /tmp/s.txt

``perf trace`` runs until interrupted (Ctrl-C once the benchmark has ended). A call during which
no response came back while requests waited stalled the whole server.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

# "  5121771.336 (236.983 ms): python/13369 fdatasync(fd: 13) = 0" (the thread is optional)
_CALL = re.compile(r"^\s*(?P<start>\d+(?:\.\d+)?) \(\s*(?P<ms>\d+(?:\.\d+)?) ms\): (?P<call>.*)$")


@dataclass(frozen=True)
class Request:
    phase: str
    start: float  # seconds, CLOCK_MONOTONIC
    end: float


@dataclass(frozen=True)
class Call:
    start: float  # seconds, CLOCK_MONOTONIC
    end: float
    text: str


def read_requests(path: Path) -> list[Request]:
    requests = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        start = float(row["start"])
        requests.append(Request(row["phase"], start, start + float(row["ms"]) / 1000))
    return requests


def read_calls(path: Path) -> list[Call]:
    """The calls of a ``perf trace -T`` output; other lines (its messages) are skipped."""
    calls = []
    for line in path.read_text().splitlines():
        match = _CALL.match(line)
        if match:
            start = float(match["start"]) / 1000
            text = " ".join(match["call"].split())
            calls.append(Call(start, start + float(match["ms"]) / 1000, text))
    return calls


def during(call: Call, requests: list[Request]) -> dict[str, object]:
    """What the requests did while ``call`` ran."""
    overlapping = [r for r in requests if r.start <= call.end and r.end >= call.start]
    phases = sorted({r.phase for r in overlapping})
    return {
        "start": round(call.start, 3),
        "ms": round(1000 * (call.end - call.start), 1),
        "call": call.text,
        "phase": "/".join(phases) or None,
        "responses_during": sum(1 for r in requests if call.start < r.end < call.end),
        "in_flight_throughout": sum(
            1 for r in requests if r.start <= call.start and r.end >= call.end
        ),
        "slowest_overlapping_ms": round(
            1000 * max((r.end - r.start for r in overlapping), default=0.0), 1
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=Path, required=True, help="benchmarks.load --trace")
    parser.add_argument("--calls", type=Path, required=True, help="perf trace -T's output")
    args = parser.parse_args(argv)
    for path in (args.requests, args.calls):
        if not path.is_file():
            parser.error(f"{path} is not a file")
    requests = read_requests(args.requests)
    if not requests:
        parser.error(f"{args.requests} holds no request")
    first, last = min(r.start for r in requests), max(r.end for r in requests)
    for call in read_calls(args.calls):
        if call.end >= first and call.start <= last:  # within the benchmark's measured time
            print(json.dumps(during(call, requests)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
