r"""Keep freed memory in the process: large temporaries then cost no page faults.

On Linux, glibc's ``malloc`` serves every request above 32 MB with a fresh
``mmap`` and returns it on ``free``.  Every large tensor is then new memory,
and its first touch faults each 4 kB page in: on the digits CNN of
``benchmarks/scale.py`` (layer rows of 0.1–0.4 GB per sample chunk) that was
a quarter to a third of a :math:`\lambda = 0.5` gradient (docs/scale.md,
"The allocator").  :func:`keep_freed_memory` makes ``malloc`` serve large
requests from its heap and keep what is freed there (``mallopt``:
``M_MMAP_MAX = 0``, ``M_TRIM_THRESHOLD`` at its maximum), so that later
temporaries reuse pages already mapped (those that fit in a freed block: one of
exactly the same size may not, as the aligned request is a little larger).  The price: the
process keeps its peak memory until it exits (the peak itself is unchanged).

This is a choice for a whole process, so the library never makes it; the
command line (``subriemann run``, ``sweep``) makes it at start-up
(:func:`set_up_from_environment`; ``SUBRIEMANN_MALLOC=default`` opts out), and a
script can call :func:`keep_freed_memory` itself.  (PyTorch's CPU tuning
guide recommends jemalloc or TCMalloc for the same reason.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_freed_memory", "set_up_from_environment"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Ask glibc's ``malloc`` to keep freed memory for reuse (module docstring).

    Returns
    -------
    bool
        Whether the setting was applied: ``False`` outside Linux with glibc
        (nothing is changed there).

    Examples
    --------
    >>> from subriemann.app.allocator import keep_freed_memory
    >>> keep_freed_memory() in (True, False)
    True
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        glibc = hasattr(libc, "gnu_get_libc_version")  # musl has mallopt, a no-op
    except (OSError, AttributeError):
        return False
    if not glibc:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def set_up_from_environment() -> bool:
    """What the command line does at start-up: :func:`keep_freed_memory`, unless the
    environment sets ``SUBRIEMANN_MALLOC=default``.

    Returns
    -------
    bool
        Whether freed memory is now kept.

    Examples
    --------
    >>> import os
    >>> from subriemann.app.allocator import set_up_from_environment
    >>> os.environ["SUBRIEMANN_MALLOC"] = "default"
    >>> set_up_from_environment()
    False
    >>> del os.environ["SUBRIEMANN_MALLOC"]
    """
    if os.environ.get("SUBRIEMANN_MALLOC", "keep") == "default":
        return False
    return keep_freed_memory()
