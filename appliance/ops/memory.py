"""Handing the memory a burst of uploads freed back to the operating system.

Python frees a request's buffers (a 3 MB phone photo, its stripped copy, the
decode buffers) into glibc's heaps, which keep them: after sixteen phone photos
at once the process stayed ~100 MB above its idle size for good (bench/NOTES.md).
glibc's `malloc_trim(0)` returns the free pages. It takes milliseconds, so it
starts only once no upload has been held for `idle_s`.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import time
from collections.abc import Callable

from ..security.limits import BodySlots

log = logging.getLogger(__name__)


def find_malloc_trim() -> Callable[[], object] | None:
    """glibc's `malloc_trim(0)` as a function; None on a C library without it (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


class IdleTrimmer:
    """Calls `trim` in a thread once uploads have stopped for `idle_s` (once per quiet spell)."""

    def __init__(self, slots: BodySlots, trim: Callable[[], object], *, idle_s: float = 1.0) -> None:
        self.slots = slots
        self.trim = trim
        self.idle_s = idle_s
        self.trims = 0
        self._trimmed_after = 0  # slots.released when we last trimmed

    async def run(self) -> None:
        """Check every `idle_s` until cancelled."""
        while True:
            await asyncio.sleep(self.idle_s)
            slots = self.slots
            if (slots.in_use == 0 and slots.released != self._trimmed_after
                    and time.monotonic() - slots.last_released_at >= self.idle_s):
                self._trimmed_after = slots.released
                try:
                    await asyncio.to_thread(self.trim)
                except Exception:  # never worth stopping the server for
                    log.exception("memory: trim failed")
                else:
                    self.trims += 1
