"""Keep a capture's memory near the size of its result under glibc's allocator.

A forward pass allocates tens of MB of short-lived CPU tensors per batch. Two glibc behaviours make the
process hold far more than that:

- *Dynamic mmap threshold.* A freed block that had been mmapped raises the threshold to its size, so
  from then on tensors of several MB come from the heap instead of mmap. Interleaved with live tensors
  they fragment it: a warm 11-layer GPT-2-small forward of 16 x 64 tokens peaks near 160 MB instead of
  about 70 MB. `fragmentation_limited` pins the threshold at 128 KiB (glibc's documented starting value,
  the same as setting `MALLOC_MMAP_THRESHOLD_=131072`) while a capture runs, so large tensors are mmapped
  and unmapped when freed; set `FEATSTEER_MALLOC_TUNING=0` to leave the allocator alone (as it is left when you set
  glibc's mmap or trim threshold yourself).
- *Retention.* Freed heap pages stay in the arenas. `trim` (`malloc_trim(0)`) hands them back between
  batches; it costs well under a millisecond, far below one batch's forward pass.

The pin has a price: every mmapped tensor is a fresh mapping whose pages the kernel faults in and zeroes on
first touch, for GPT-2 small about 40% of the capture's CPU time again as system time. Kept for the whole
process, as it once was, it charged that to every later forward pass and generation too (a quarter of
`make demo`'s CPU time was system time), where no memory bound asks for it. So it is released when the
capture returns: the threshold goes to glibc's ceiling (32 MiB, where its dynamic threshold ends up after a
forward pass frees large tensors) and the trim threshold to twice that, as glibc's dynamic rule sets them.

Measured in `benchmarks/capture_throughput.py` (memory section). Elsewhere (macOS, musl, Windows)
both functions do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys
import threading
from collections.abc import Iterator

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers in glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024
RELEASED_MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
"""glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: the most its dynamic threshold grows to."""
RELEASED_TRIM_THRESHOLD_BYTES = 2 * RELEASED_MMAP_THRESHOLD_BYTES
"""What glibc's dynamic rule sets the trim threshold to beside that mmap threshold."""


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


USER_MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
"""Environment variables by which the user sets the thresholds `fragmentation_limited` sets; glibc's tunables
(`GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:glibc.malloc.trim_threshold=...`) count too."""


def _user_chose_thresholds() -> bool:
    """Whether the user set glibc's mmap or trim threshold for this process (`USER_MALLOC_SETTINGS`, `GLIBC_TUNABLES`):
    either also turns glibc's dynamic thresholds off, so releasing the pin to glibc's dynamic ceiling would override it."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return (any(name in os.environ for name in USER_MALLOC_SETTINGS)
            or any(f"glibc.malloc.{name}=" in tunables for name in ("mmap_threshold", "trim_threshold")))


def _tunable_mallopt():
    """glibc's `mallopt`, or None when it is missing or the user asked to leave the allocator alone
    (`FEATSTEER_MALLOC_TUNING=0`, or their own mmap or trim threshold, `_user_chose_thresholds`)."""
    if os.environ.get("FEATSTEER_MALLOC_TUNING", "1") == "0" or _user_chose_thresholds():
        return None
    return _libc_function("mallopt", (ctypes.c_int, ctypes.c_int))


class _PinDepth:
    """How many `fragmentation_limited` blocks are open (a capture inside a capture keeps the pin), counted under `lock`:
    threads capturing at once share the process's allocator, so the last one out releases the pin, and one that enters
    while another leaves never finds the pin released under it."""

    open_blocks = 0
    lock = threading.Lock()


@contextlib.contextmanager
def fragmentation_limited() -> Iterator[bool]:
    """Pin glibc's mmap threshold at 128 KiB inside the block; yield True if it was pinned.

    On leaving the outermost block the pin is released (mmap threshold 32 MiB, trim threshold 64 MiB), so that
    forward passes outside a capture reuse heap pages instead of faulting in fresh ones for every tensor.
    Safe to enter from several threads at once. Does nothing when `FEATSTEER_MALLOC_TUNING=0` or the user already chose
    glibc's mmap or trim threshold (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, or either in `GLIBC_TUNABLES`).
    """
    mallopt = _tunable_mallopt()
    if mallopt is None:
        yield False
        return
    with _PinDepth.lock:
        pinned = _PinDepth.open_blocks > 0 or bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
        _PinDepth.open_blocks += 1
    try:
        yield pinned
    finally:
        with _PinDepth.lock:
            _PinDepth.open_blocks -= 1
            if _PinDepth.open_blocks == 0:
                mallopt(M_MMAP_THRESHOLD, RELEASED_MMAP_THRESHOLD_BYTES)
                mallopt(M_TRIM_THRESHOLD, RELEASED_TRIM_THRESHOLD_BYTES)


def trim() -> bool:
    """Return free heap pages to the OS; True if the allocator supports it (glibc)."""
    function = _malloc_trim()
    if function is None:
        return False
    function(0)
    return True
