"""A budget shared by all requests of one server: how many base64 pixels may be decoded and
held at once. A request waits (in arrival order) until its pixels fit, so many concurrent
requests of large images cost one budget of memory, not one image each."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
from collections.abc import AsyncIterator


class PixelBudget:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"PixelBudget: capacity must be >= 1, got {capacity}.")
        self.capacity, self.in_use = capacity, 0
        self._turn = asyncio.Lock()  # one waiter at a time: arrival order, no starvation
        self._freed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def reserve(self, pixels: int) -> AsyncIterator[None]:
        """Hold `pixels` (at most `capacity`) for the block; 0 holds nothing and never waits."""
        if pixels > self.capacity:
            raise ValueError(f"PixelBudget: {pixels} pixels asked, capacity {self.capacity}.")
        if pixels > 0:
            async with self._turn, self._freed:
                await self._freed.wait_for(lambda: self.in_use + pixels <= self.capacity)
                self.in_use += pixels
        try:
            yield
        finally:
            if pixels > 0:
                async with self._freed:
                    self.in_use -= pixels
                    self._freed.notify_all()
                if pixels >= GIVE_BACK_PIXELS:
                    _give_back_freed_memory()


# glibc keeps large freed blocks for reuse (per thread arena), so a service's RSS stays at its
# peak after a burst of large images; handing them back costs about a millisecond.
GIVE_BACK_PIXELS = 4_000_000


def _give_back_freed_memory() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)
