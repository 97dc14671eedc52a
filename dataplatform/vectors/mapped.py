"""The on-disk originals' resident pages, given back to the page cache.

With the originals on disk (engine memory "cold") the engine reads an optimized segment's
float32 vectors through a read-only shared mapping of `vector_storage/matrix.dat`. Every
page a rescoring touched stays mapped in this process and counts in its RSS until the
process exits: at 1M x 768 the serving RSS grew from 1.25 GB after 1,000 distinct queries
to 2.64 GB after 20,000 (README, "Vectors at a million"). `madvise(MADV_DONTNEED)` on those
mappings drops the pages from this process's page tables only: they stay in the page cache,
and the next read maps them again with a minor fault (or reads the disk, if the kernel has
dropped them since).

That is safe only for a mapping nobody can have written (read-only, shared, file-backed:
the kernel re-reads the file's own bytes) and that nobody unmaps meanwhile (an address
range freed and reused by another allocation would lose that memory): the caller holds
the collection's read lock (only its writer closes or reopens the shard) and its segments
lock (an optimize in a worker thread drops segments while searches go on).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from pathlib import Path

_MADV_DONTNEED = 4  # Linux
_ORIGINALS = "/vector_storage/matrix.dat"  # an optimized segment's float32 vectors

if sys.platform.startswith("linux"):
    _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    _libc.madvise.restype = ctypes.c_int
else:  # no /proc/self/maps: nothing is released
    _libc = None


def release_originals(shard_dir: Path) -> int:
    """Drops this process's resident pages of the originals under `shard_dir` (read-only
    shared mappings of `matrix.dat` only); returns the bytes of mappings advised."""
    if _libc is None:
        return 0
    prefix = str(shard_dir) + "/"
    released = 0
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or fields[1] != "r--s":
                continue
            path = fields[5].rstrip("\n")
            if not (path.startswith(prefix) and path.endswith(_ORIGINALS)):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if _libc.madvise(start, end - start, _MADV_DONTNEED) == 0:
                released += end - start
    return released
