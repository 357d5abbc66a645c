"""processing.keep_freed_memory: malloc keeps freed blocks, so a study's large buffers are
not faulted in again for the next one (cxrbatch/allocator.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from cxrbatch import allocator, worker
from cxrbatch.config import load_settings
from cxrbatch.site import Site

# In a child process: the setting is process-wide and would change pytest's own heap.
FAULTS_PER_ROUND = textwrap.dedent(
    """
    import ctypes, json, resource, threading
    from cxrbatch.allocator import keep_freed_memory

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    SIZE = 64 << 20  # above glibc's largest mmap threshold: always mapped afresh by default

    def faults(blocks=1):  # page faults of allocating, touching and freeing blocks
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        pointers = [libc.malloc(SIZE // blocks) for _ in range(blocks)]
        for pointer in pointers:
            libc.memset(pointer, 1, SIZE // blocks)
        for pointer in pointers:
            libc.free(pointer)
        return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before

    default = [faults() for _ in range(3)]
    kept = keep_freed_memory()
    after = [faults() for _ in range(3)]
    # A thread started later (a study in flight): two 32 MiB blocks, which by default
    # fill a thread arena's 64 MiB heaps, unmapped again when they empty.
    in_thread = []
    thread = threading.Thread(target=lambda: in_thread.extend(faults(2) for _ in range(3)))
    thread.start()
    thread.join()
    print(json.dumps({"default": default, "kept": kept, "after": after,
                      "in_thread": in_thread, "pages": SIZE // 4096}))
    """
)


def test_freed_blocks_are_reused_instead_of_faulted_in_again() -> None:
    if allocator._glibc() is None:
        pytest.skip("glibc only: elsewhere the allocator keeps its defaults")
    proc = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_ROUND], capture_output=True, text=True, check=True
    )
    result = json.loads(proc.stdout)
    pages = result["pages"]
    # By default every round maps the block afresh: a fault per page, every time.
    assert all(f > pages // 2 for f in result["default"]), result
    assert result["kept"] is True
    # Kept: the first round grows the heap, the next ones reuse its pages, in other
    # threads too.
    assert all(f < pages // 100 for f in result["after"][1:]), result
    assert all(f < pages // 100 for f in result["in_thread"]), result


@pytest.mark.parametrize("keep", [True, False])
def test_a_study_processor_applies_the_setting(
    keep: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(worker, "keep_freed_memory", lambda: calls.append(True) or True)
    settings = load_settings(None, processing={"keep_freed_memory": keep})
    models = SimpleNamespace(refs=())  # no model loading: only the set-up is under test
    processor = worker.StudyProcessor(
        Site(settings, tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}"),
        models,  # type: ignore[arg-type]
    )
    processor.close()
    assert calls == ([True] if keep else [])
