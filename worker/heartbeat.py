"""A thread that keeps a claimed round's heartbeat fresh and watches for cancel / loss.

It polls the round every ``poll_seconds`` (a read, one short transaction) and writes
``heartbeat_at`` every ``interval_seconds``. The training and scoring loops call
:meth:`Heartbeat.should_stop` before every batch: it only reads two flags, so it costs nothing.
A failed poll (database briefly unavailable) is logged and retried at the next tick; if the
database stays away, the heartbeat goes stale and the reaper takes the round over.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Protocol

from worker import records
from worker.records import Claim, Sessions

log = logging.getLogger(__name__)


class RoundStopped(Exception):
    """Raised between phases when the round was cancelled or is no longer this run's."""


class Signal(Protocol):
    """What one poll answers: is the job still this attempt's, and was a cancel asked for."""

    @property
    def owned(self) -> bool: ...

    @property
    def cancel_requested(self) -> bool: ...


class Heartbeat:
    """The heartbeat of a claimed round; with ``beat``, ``label`` and ``stopped``, of any job
    claimed the same way (the warm start: ``worker.pretrain``)."""

    def __init__(
        self,
        sessions: Sessions,
        claim: Claim | None,
        interval_seconds: float,
        poll_seconds: float = 2.0,
        *,
        beat: Callable[[bool], Signal] | None = None,
        label: str | None = None,
        stopped: type[Exception] = RoundStopped,
    ) -> None:
        if beat is None:
            if claim is None:
                raise ValueError("a heartbeat needs a round claim or a beat function")
            round_claim = claim

            def beat(write: bool) -> Signal:
                return records.beat(sessions, round_claim, write=write)

            label = label or f"round {claim.round_id} attempt {claim.attempt}"
        self.sessions = sessions
        self.claim = claim
        self._beat = beat
        self.label = label or "job"
        self._stopped = stopped
        self.interval = interval_seconds
        self.poll = max(0.05, min(poll_seconds, interval_seconds))
        self.owned = True
        self.cancel_requested = False
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"heartbeat-{self.label.replace(' ', '-')}", daemon=True
        )

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        last_beat = time.monotonic()
        while not self._stop.wait(self.poll):
            write = time.monotonic() - last_beat >= self.interval
            try:
                signal = self._beat(write)
            except Exception:  # keep beating through a database blip
                log.warning("%s: heartbeat failed", self.label, exc_info=True)
                continue
            if write:
                last_beat = time.monotonic()
            self.owned = signal.owned
            self.cancel_requested = signal.cancel_requested
            if not signal.owned:  # finished, or re-queued by the reaper: stop beating
                log.info("%s: no longer running", self.label)
                return

    def should_stop(self) -> bool:
        """True once a cancel was requested or the round was taken over (cheap: flags only)."""
        return self.cancel_requested or not self.owned

    def check(self) -> None:
        """Raise :class:`RoundStopped` (or the job's ``stopped``) if :meth:`should_stop`."""
        if self.should_stop():
            raise self._stopped(f"{self.label} stopped")
