"""The worker process's entry point, importable without torch.

`cxrbatch watch` spawns its workers with this function as the target: the parent (the
ingest loop, the receiver, the sender) pickles a reference to it and so imports this
module, not `cxrbatch.worker` with torch, highdicom and the pipeline, which only the child
loads. tests/test_daemon.py checks that the parent stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cxrbatch.config import Settings

# A worker process that cannot start (its models do not load) exits with this code; the
# daemon stops instead of respawning it forever (cxrbatch/worker.py uses the same value).
EXIT_CANNOT_START = 3


def worker_process_main(
    settings: Settings, out_dir: Path, url: str, threads: int, parent_pid: int | None
) -> None:
    from cxrbatch.worker import worker_process_main as main

    main(settings, out_dir, url, threads, parent_pid)
