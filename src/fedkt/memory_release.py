"""Give the memory a finished phase freed back to the OS (glibc's ``malloc_trim``), so the next phase's
peak RSS is its own live tensors, not those plus the last phase's freed ones.

glibc's default allocator raises its mmap threshold each time a large block is freed (up to 32 MiB), so a
training phase's activations soon live in the heap, and freeing them keeps the pages resident for reuse.
The next phase (a server's distillation after a client's training) allocates tensors of other sizes beside
them, and the process's high-water mark becomes the sum of both phases' peaks rather than the larger one
(docs/gpu.md, "Plan vs measured": 1.33x ``fedkt plan``'s estimate at batch 16 without it). ``release()`` at a
phase boundary returns the free pages of every arena (``malloc_trim(0)``); the next phase faults in what it
needs. It is a no-op where there is no glibc (macOS, Windows, musl) and never raises.

The in-process runtime calls it after each client's handler (``federation/local.py``), the round driver
after each round's algorithm step and after the evaluation (``rounds.py``), the experiment after each method.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Callable

enabled = True
"""Off: ``release()`` does nothing (``benchmarks/plan_vs_measured.py`` measures the run without it)."""

calls = 0
"""How many times ``release()`` trimmed (tests and the benchmark read it)."""

_trim: Callable[[int], int] | None | bool = False  # False: not looked up yet; None: not available


def _find_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` off Linux/glibc (musl has no such symbol)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def available() -> bool:
    """Whether this process's C library has ``malloc_trim`` (Linux with glibc)."""
    global _trim
    if _trim is False:
        _trim = _find_trim()
    return _trim is not None


def release() -> bool:
    """Return the heap's free pages to the OS; True when it trimmed (False: disabled or no glibc)."""
    global calls
    if not enabled or not available():
        return False
    try:
        _trim(0)  # type: ignore[misc]
    except Exception:  # noqa: BLE001 - a memory hint must never fail a run
        return False
    calls += 1
    return True
