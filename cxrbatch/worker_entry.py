"""The worker process's entry point, importable without torch.

`cxrbatch watch` spawns its workers with this function as the target: the parent (the
ingest loop, the receiver, the sender) pickles a reference to it and so imports this
module, not `cxrbatch.worker` with torch, highdicom and the pipeline, which only the child
loads. tests/test_daemon.py checks that the parent stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cxrbatch.site import Site

# A worker process that cannot start (its models do not load) exits with this code; the
# daemon stops instead of respawning it forever (cxrbatch/worker.py uses the same value).
EXIT_CANNOT_START = 3


def worker_process_main(site: Site, threads: int, parent_pid: int | None) -> None:
    from cxrbatch.worker import worker_process_main as main

    main(site, threads, parent_pid)
