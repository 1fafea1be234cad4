"""Limits on what requests may cost the server, and a log that cannot be flooded.

A 49 KB PNG can decode to 64 MB. So the size of every image is read from its header before anything is decoded, and
three budgets bound the decoded bytes: per image (``max_image_pixels``), per request or stream message
(``max_request_decoded_mb``), and across the whole server while items wait to be scored
(``max_decoded_mb_in_flight``), where a decoding thread waits for room (back-pressure on the stream or call that
brought the image). A limit a request can never meet is INVALID_ARGUMENT; only transient fullness waits.
"""

from __future__ import annotations

import logging
import threading
import time


class DecodeBudget:
    """Decoded bytes held across the server; ``acquire`` blocks the calling (decoding) thread until there is room."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._room = threading.Condition()

    def acquire(self, size: int, timeout: float | None) -> bool:
        """Reserve ``size`` bytes, waiting up to ``timeout`` seconds (None: until there is room); False on timeout.
        ``size`` must not exceed ``limit``."""
        with self._room:
            if not self._room.wait_for(lambda: self.in_use + size <= self.limit, timeout):
                return False
            self.in_use += size
            return True

    def release(self, size: int) -> None:
        with self._room:
            self.in_use -= size
            self._room.notify_all()


class RateLimitedLog:
    """One warning per ``interval_s`` about a kind of bad request, with how many there were since the last one, so
    that a client sending garbage cannot fill the log."""

    def __init__(self, logger: logging.Logger, event: str, interval_s: float = 60.0) -> None:
        self._logger = logger
        self._event = event
        self._interval_s = interval_s
        self._last = -interval_s
        self._suppressed = 0
        self._lock = threading.Lock()

    def warning(self, detail: str, peer: str) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self._interval_s:
                self._suppressed += 1
                return
            suppressed, self._suppressed, self._last = self._suppressed, 0, now
        self._logger.warning(self._event, extra={"detail": detail, "peer": peer, "more_since_last": suppressed})
