"""Budgets shared by all requests of one server: how many decoded pixels, and how many body
bytes, may be held at once. A request waits (in arrival order) until its share fits, so many
concurrent requests of large images or bodies cost one budget of memory, not one each."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
from collections.abc import AsyncIterator


class Budget:
    """`capacity` units (pixels, bytes) held at once; a block of at least `give_back_at` units
    hands freed memory back to the system when it ends."""

    def __init__(self, capacity: int, unit: str = "pixels", give_back_at: int = 4_000_000):
        if capacity < 1:
            raise ValueError(f"Budget: capacity must be >= 1, got {capacity}.")
        self.capacity, self.in_use, self.unit = capacity, 0, unit
        self.give_back_at = give_back_at
        self._turn = asyncio.Lock()  # one waiter at a time: arrival order, no starvation
        self._freed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def reserve(self, pixels: int) -> AsyncIterator[None]:
        """Hold `pixels` units (at most `capacity`) for the block; 0 holds nothing and never
        waits."""
        if pixels > self.capacity:
            raise ValueError(
                f"Budget: {pixels} {self.unit} asked, capacity {self.capacity} {self.unit}."
            )
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
                if pixels >= self.give_back_at:
                    _give_back_freed_memory()


# glibc keeps large freed blocks for reuse (per thread arena), so a service's RSS stays at its
# peak after a burst of large images or bodies; handing them back costs about a millisecond.


def _give_back_freed_memory() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)
