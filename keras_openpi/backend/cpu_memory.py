"""Keeping freed memory in the process, so that XLA's CPU buffers are not page-faulted in at every step."""

import ctypes
import platform

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def retain_freed_memory():
    """Makes glibc's malloc keep freed memory for reuse instead of returning it to the OS.

    XLA on CPU allocates each compiled program's temporaries (2.9 GB for a
    training step of the small π0 in `benchmarks/pi0_speed.py`) and its
    outputs with `malloc` at every run. glibc serves such large blocks with
    fresh `mmap`s and unmaps them when freed, so every step page-faults all
    of that memory in again (the kernel zeroes each 4 KiB page): about a
    fifth of a CPU training step (5.0 s -> 3.9 s in that benchmark). With one
    malloc arena, no `mmap` for large blocks and no trimming, freed blocks
    are reused as they are.

    The process keeps its peak memory (it is not returned to the OS), so use
    this in training and serving processes, not in a shared notebook. Call it
    before JAX runs anything: threads that already allocated keep their own
    arenas. It only concerns host memory, and does nothing outside glibc
    (macOS, Windows, musl): there it returns False.

    Returns:
        True when glibc accepted the settings.

    Example:
    >>> from keras_openpi.backend import retain_freed_memory
    >>> retain_freed_memory()  # doctest: +SKIP
    True
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # -1 is read as SIZE_MAX: never mmap, never trim.
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, -1), (_M_TRIM_THRESHOLD, -1))
    return all(mallopt(option, value) == 1 for option, value in settings)
