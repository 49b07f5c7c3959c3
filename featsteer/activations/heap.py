"""Keep a capture's memory near the size of its result under glibc's allocator.

A forward pass allocates tens of MB of short-lived CPU tensors per batch. Two glibc behaviours make the
process hold far more than that:

- *Dynamic mmap threshold.* A freed block that had been mmapped raises the threshold to its size, so
  from then on tensors of several MB come from the heap instead of mmap. Interleaved with live tensors
  they fragment it: a warm 11-layer GPT-2-small forward of 16 x 64 tokens peaks near 160 MB instead of
  about 70 MB. `limit_fragmentation` pins the threshold at 128 KiB (glibc's documented starting value,
  the same as setting `MALLOC_MMAP_THRESHOLD_=131072`), so large tensors are mmapped and unmapped when
  freed. It applies to the whole process, once; set `FEATSTEER_MALLOC_TUNING=0` to leave the allocator
  alone.
- *Retention.* Freed heap pages stay in the arenas. `trim` (`malloc_trim(0)`) hands them back between
  batches; it costs well under a millisecond, far below one batch's forward pass.

Measured in `benchmarks/capture_throughput.py` (memory section). Elsewhere (macOS, musl, Windows)
both functions do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
MMAP_THRESHOLD_BYTES = 128 * 1024


@functools.cache
def _libc_function(name: str, argtypes: tuple):
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        function = getattr(libc, name)
    except (OSError, AttributeError):  # not glibc
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function


def _malloc_trim():
    return _libc_function("malloc_trim", (ctypes.c_size_t,))


@functools.cache
def limit_fragmentation() -> bool:
    """Pin glibc's mmap threshold at 128 KiB for this process (once); True if it was set.

    Skipped when `FEATSTEER_MALLOC_TUNING=0` or the user already chose `MALLOC_MMAP_THRESHOLD_`.
    """
    if os.environ.get("FEATSTEER_MALLOC_TUNING", "1") == "0" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    function = _libc_function("mallopt", (ctypes.c_int, ctypes.c_int))
    return bool(function is not None and function(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def trim() -> bool:
    """Return free heap pages to the OS; True if the allocator supports it (glibc)."""
    function = _malloc_trim()
    if function is None:
        return False
    function(0)
    return True
