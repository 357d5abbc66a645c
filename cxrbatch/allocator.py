"""How a processing process's C heap treats freed memory (no torch import).

glibc's malloc serves each request above its mmap threshold (128 KiB at first, rising to
at most 32 MiB as such blocks are freed) with pages of its own from the kernel and
returns them on free. A study allocates many blocks above that: the float64 copies of a
3000 x 3000 image while decoding (72 MB each), full-size masks, network activations.
Every time, the kernel maps, faults in and zeroes those pages again: in the harness's
tuned run on a 2-core host, 3.7 million page faults and 18-19 s of system CPU time in a
run of about 80 s.

`keep_freed_memory` has malloc serve every request from its heaps (M_MMAP_MAX = 0),
keep up to `TRIM_THRESHOLD_BYTES` free at a heap's top instead of returning it
(M_TRIM_THRESHOLD), and give the threads started from then on the main heap
(M_ARENA_MAX = 1: a thread's own arena is made of 64 MiB heaps that are unmapped
whenever one empties, so the studies in flight on threads would fault their buffers in
afresh all the same). The next study reuses the pages already faulted in: 0.4 million
faults and 5 s of system time in that run, 0-10 % faster, peak RSS 0.1 GiB lower
(docs/performance.md). PyTorch's CPU tuning guide gets the same by preloading jemalloc
or tcmalloc; this needs no second allocator. Free memory beyond the threshold is still
returned; below it, a worker holds on to its high-water mark of memory between studies
instead of handing it back after each.

glibc only (Linux); elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TRIM_THRESHOLD_BYTES = 1 << 30


def _glibc() -> ctypes.CDLL | None:
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        return ctypes.CDLL(None)  # the C library this process already runs on
    except (ValueError, OSError, AttributeError):  # not glibc, or no confstr (Windows)
        return None


def keep_freed_memory() -> bool:
    """Make this process's malloc keep freed memory for reuse (for the whole process,
    from now on); whether it took effect. Called before the process starts threads
    (StudyProcessor does, before it loads the models), so that all of them share the
    main heap."""
    libc = _glibc()
    if libc is None:
        log.debug("not glibc: the allocator keeps its defaults")
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 on an invalid value
    done = all(
        mallopt(parameter, value) == 1
        for parameter, value in (
            (M_MMAP_MAX, 0),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
            (M_ARENA_MAX, 1),
        )
    )
    if not done:
        log.warning("mallopt refused the settings: the allocator keeps its defaults")
    return done
