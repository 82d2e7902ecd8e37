"""Process set-up for steadier timings: glibc's allocator thresholds, and torch's messages that
are not the user's to act on.

On these VMs most timing noise comes from glibc giving large buffers back to the kernel and
taking them again between calls. ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:
glibc.malloc.trim_threshold=1073741824`` stops that; ``set_allocator_thresholds`` makes the same
two requests through ``mallopt`` at start-up, so ``mpm-bench`` needs no environment variable.
glibc accepts the trim threshold and refuses an mmap threshold above 32 MiB, through the
environment variable or ``mallopt`` alike; the trim threshold also turns off the dynamic mmap
threshold. What took effect is recorded in every results header.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import warnings

__all__ = ["TUNABLES", "set_allocator_thresholds", "allocator_state", "quiet_torch"]

TUNABLES = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_GIB = 1 << 30
_state = {"how": "not set"}


def set_allocator_thresholds() -> dict:
    """The trim and mmap thresholds of ``TUNABLES``, by ``mallopt`` (unless the environment
    already set them). Returns ``allocator_state()``."""
    if os.environ.get("GLIBC_TUNABLES") == TUNABLES:
        _state.update(how="GLIBC_TUNABLES", trim_threshold=True)
        return allocator_state()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = bool(libc.mallopt(_M_TRIM_THRESHOLD, _GIB))
        mmap = bool(libc.mallopt(_M_MMAP_THRESHOLD, _GIB))
    except (OSError, AttributeError):  # not glibc: nothing to set
        _state.update(how="not set (no glibc mallopt)")
        return allocator_state()
    _state.update(how="mallopt at start-up", trim_threshold=trim, mmap_threshold=mmap)
    return allocator_state()


def allocator_state() -> dict:
    """How the allocator thresholds were set in this process, for results headers."""
    return dict(_state)


def quiet_torch() -> None:
    """Hide torch's own notices from inside Inductor's lowering (FutureWarnings, "No CUDA
    runtime is found" on a CPU machine): nothing in them is the user's to act on."""
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch._inductor")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
