"""How many CPU threads each worker process gets (no torch import: the daemon's ingest
process uses it too)."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: taskset, cpusets), else all."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_worker(workers: int) -> int:
    """An equal share of the usable CPUs for each of `workers` worker processes; the
    `processing.study_threads` studies in flight in a worker share its share."""
    return max(1, usable_cpus() // max(1, workers))
