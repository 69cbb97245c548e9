"""The gateway's concurrency slots: per API key (and one bucket for every caller without
a key), each with a small bounded queue in front of it.

Separate from guard.py, the middleware that decides which bucket a request takes and
answers 429 when `KeyedLimiter.slot` raises Busy; this module knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from csm_servers.gateway.guard import GatewayLimits

__all__ = ["OPEN_BUCKET", "Busy", "KeyedLimiter"]

OPEN_BUCKET = "open"  # the bucket of every caller without a key


class Busy(Exception):
    """No slot and no room in the queue (or waited too long)."""


class _Bucket:
    def __init__(self, slots: int):
        self.free = asyncio.Semaphore(slots)
        self.waiting = 0
        self.users = 0


class KeyedLimiter:
    """Slots per bucket, a bounded queue in front of them; idle buckets are dropped."""

    def __init__(self, limits: GatewayLimits):
        self.limits = limits
        self._buckets: dict[str, _Bucket] = {}

    def _bounds(self, bucket: str) -> tuple[int, int]:
        if bucket == OPEN_BUCKET:
            return self.limits.max_concurrency_open, self.limits.max_queue_open
        return self.limits.max_concurrency_per_key, self.limits.max_queue_per_key

    @contextlib.asynccontextmanager
    async def slot(self, name: str) -> AsyncIterator[None]:
        slots, queue = self._bounds(name)
        bucket = self._buckets.setdefault(name, _Bucket(slots))
        if bucket.free.locked() and bucket.waiting >= queue:
            raise Busy(
                f"{slots} requests of this {'caller' if name == OPEN_BUCKET else 'key'} are at work "
                f"and {bucket.waiting} wait; try again later"
            )
        bucket.users += 1
        try:
            bucket.waiting += 1
            try:
                await asyncio.wait_for(bucket.free.acquire(), self.limits.queue_timeout_s)
            except TimeoutError:
                raise Busy(
                    f"waited {self.limits.queue_timeout_s:g} s for one of {slots} slots; try again later"
                ) from None
            finally:
                bucket.waiting -= 1
            try:
                yield
            finally:
                bucket.free.release()
        finally:
            bucket.users -= 1
            if bucket.users == 0:
                self._buckets.pop(name, None)
