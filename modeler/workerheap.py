"""Keeps a Spark Python worker's garbage collector off its long-lived heap, and trims its C heap after a big task.

PySpark's daemon runs ``gc.collect()`` after every task a reused worker finishes. A worker
that has imported numpy, pyspark, kafka and redis holds ~58k container objects (functions,
dicts, tuples of the modules), and each full collection walks all of them: 10-25 ms on this
project's 2-core machine, four or more times per micro-batch (the Kafka read, the training
task, the end-of-batch read of the model), about a tenth of a 20,000-rating batch's time on
ml-latest-small.

:func:`settle` is called first thing by the modeler's task functions. On a worker's 1st,
4th and 16th call it moves every object alive then into the interpreter's permanent
generation (``gc.freeze()``), which collections skip; later tasks' objects are collected
as before. The calls come at a task's start, right after the daemon's collection of the
previous task, so what is frozen is the modules and caches imported so far (lazily
imported ones arrive in the first tasks, hence three calls) and the current task's closure.
Frozen objects are still freed by reference counting; only a frozen object in a reference
cycle that later becomes garbage is kept, which the three calls bound to a few closures per
worker process. Standard library only: importable in any worker.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

# Calls of settle() on which the heap is frozen (counted per process).
FREEZE_ON = (1, 4, 16)

_calls = 0


def settle() -> None:
    """Count this task; on the calls in :data:`FREEZE_ON`, freeze the objects alive now."""
    global _calls
    _calls += 1
    if _calls in FREEZE_ON:
        gc.freeze()


def calls() -> int:
    """How many times :func:`settle` ran in this process."""
    return _calls


def trim() -> None:
    """Hand the C heap's free pages back to the kernel (glibc's ``malloc_trim``; nothing
    where there is none). For the end of a one-off task that allocated a lot (a restore):
    a reused process otherwise keeps what it freed for the rest of its life. Measured after
    a restart at ~190k keys: the driver 111 -> 82 MiB; the workers ~310 -> ~290 MiB (what
    they keep is mostly Python's own arenas, which this does not return)."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else False
        except OSError:
            _libc = False
    if isinstance(_libc, ctypes.CDLL) and hasattr(_libc, "malloc_trim"):
        gc.collect()
        _libc.malloc_trim(0)


_libc: ctypes.CDLL | bool | None = None
