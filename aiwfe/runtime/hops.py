"""Wall-clock marks at the hops of a task's dispatch, for `python -m benchmarks.workflows`.

With AIWFE_BENCH_HOPS naming a file, `mark` appends one "key hop seconds pid" line to it
(one file, every process of the suite; wall clock, so the processes' marks compare); the
benchmark's external phase reads them to time step ready (the commit that made the step
runnable) → task received, hop by hop. Unset, as everywhere but that benchmark, `ENABLED`
is False and callers skip even the call.
"""

from __future__ import annotations

import os
import time

ENV = "AIWFE_BENCH_HOPS"
_PATH = os.environ.get(ENV)
ENABLED = bool(_PATH)
_FILE = open(_PATH, "a", buffering=1, encoding="ascii") if _PATH else None


def mark(key: str, hop: str) -> None:
    """Appends `hop` of `key` (a workflow id) at the wall-clock time now."""
    if _FILE is not None:
        _FILE.write(f"{key} {hop} {time.time():.6f} {os.getpid()}\n")
