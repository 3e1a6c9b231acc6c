"""Flow control of the OpenAI-compatible backend's request pools, apart from the HTTP client: the
pause of a whole pool after 429s (:class:`PoolPause`, from :func:`retry_after` or a doubling backoff),
even pacing of requests or tokens per minute (:class:`Pace`), and one request's tries as the client's
send hooks see them (:class:`Attempts`). A PoolPause or Pace is shared by the pool's threads (it
locks); an Attempts belongs to the thread of its request.
"""

from __future__ import annotations

import contextlib
import email.utils
import math
import threading
import time
from dataclasses import dataclass

# The longest pause of the whole pool after 429s without Retry-After (a rate window is a minute).
MAX_POOL_PAUSE_S = 60.0


def retry_after(headers) -> float | None:
    """Seconds to wait from ``Retry-After-Ms`` / ``Retry-After`` (seconds or an HTTP date), when the
    client would honour them too (more than 0, at most two minutes)."""
    wait = None
    if headers.get("retry-after-ms"):
        with contextlib.suppress(ValueError):
            wait = float(headers["retry-after-ms"]) / 1000
    value = headers.get("retry-after")
    if wait is None and value:
        try:
            wait = float(value)
        except ValueError:
            try:
                wait = (email.utils.parsedate_to_datetime(value).timestamp()) - time.time()
            except (TypeError, ValueError):
                return None
    return wait if wait is not None and 0 < wait <= 120 else None


class PoolPause:
    """A 429 means the server is over its limit for every request, not only the refused one: all of the
    pool's requests wait out the pause before they are sent. The pause is the answer's Retry-After, else
    ``backoff_s``, doubled for each 429 in a row on a request sent after the previous pause began (one
    that pause did not cover); 429s of requests already in flight when it began are the same burst."""

    def __init__(self, backoff_s: float):
        self.backoff_s = backoff_s
        self.until = 0.0
        self.began = -math.inf
        self.streak = 0
        self.lock = threading.Lock()

    def wait(self) -> None:
        while (left := self.until - time.monotonic()) > 0:
            time.sleep(left)

    def refused(self, sent_at: float, wait: float | None) -> None:
        with self.lock:
            now = time.monotonic()
            if sent_at >= self.began:
                self.streak += 1
                self.began = now
                if wait is None:
                    wait = min(self.backoff_s * 2 ** (self.streak - 1), MAX_POOL_PAUSE_S)
            self.until = max(self.until, now + (wait or 0.0))

    def answered(self, sent_at: float) -> None:
        with self.lock:
            if sent_at >= self.began:
                self.streak = 0


class Pace:
    """At most ``per_minute`` units (requests or tokens) a minute, evenly spaced: a start waits until the
    previous one's units x 60 / per_minute seconds have passed. Nothing is booked ahead and no burst is
    allowed, so the rate holds over any stretch of time, and ``settle`` can correct an estimate (a
    request's tokens) once the server has counted them, before the next start is decided."""

    def __init__(self, per_minute: float):
        self.seconds_per_unit = 60.0 / per_minute
        self.next_start = 0.0
        self.lock = threading.Lock()

    def take(self, units: float) -> None:
        while True:
            with self.lock:
                now = time.monotonic()
                if self.next_start <= now:
                    self.next_start = now + units * self.seconds_per_unit
                    return
                wait = self.next_start - now
            time.sleep(wait)

    def settle(self, estimated: float, counted: float) -> None:
        with self.lock:
            self.next_start += (counted - estimated) * self.seconds_per_unit


@dataclass
class Attempts:
    """One request's tries, seen by the client's send hooks (which run on the request's thread)."""

    tokens: float
    count: int = 0
    sent_at: float = 0.0
