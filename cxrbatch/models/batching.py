"""Batching across studies: forward passes that threads ask for at about the same time
run as one batch.

With `processing.study_threads` studies in flight in a worker process, each thread asks
for its own image's encoder and classifier passes. On a GPU a batch of one leaves the
device mostly idle; `Batcher` puts the requests on a queue that one thread drains: it
takes the first, waits at most `max_wait_s` for more (up to `max_batch` images), runs the
network once on the concatenation and hands each caller its rows. Results equal those of
separate calls up to floating-point summation order (tests/test_batching.py).

On the CPU batching bought nothing on this project's 2-core machine (docs/performance.md),
so `processing.max_batch = 0` (auto) batches on CUDA only, up to the studies in flight.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import torch

Forward = Callable[[torch.Tensor], torch.Tensor]


class Batcher:
    """Callable like the `forward` it wraps: (N, ...) in, (N, ...) out, N = 1 usually."""

    def __init__(self, forward: Forward, max_batch: int, max_wait_s: float = 0.005) -> None:
        if max_batch < 2:
            raise ValueError(f"a Batcher needs max_batch >= 2, found {max_batch}")
        self.forward = forward
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.batch_sizes: list[int] = []  # what ran, for measurement and tests
        self._requests: queue.Queue[tuple[torch.Tensor, Future[torch.Tensor]]] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="batcher", daemon=True)
        self._thread.start()

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        done: Future[torch.Tensor] = Future()
        self._requests.put((inputs, done))
        return done.result()

    def _gather(self) -> list[tuple[torch.Tensor, Future[torch.Tensor]]]:
        first = self._requests.get()
        taken = [first]
        size = first[0].shape[0]
        deadline = time.monotonic() + self.max_wait_s
        while size < self.max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = self._requests.get(timeout=remaining)
            except queue.Empty:
                break
            taken.append(item)
            size += item[0].shape[0]
        return taken

    def _serve(self) -> None:
        while True:
            taken = self._gather()
            try:
                with torch.inference_mode():
                    joined = torch.cat([inputs for inputs, _ in taken])
                    outputs = self.forward(joined)
                self.batch_sizes.append(joined.shape[0])
                start = 0
                for inputs, done in taken:
                    done.set_result(outputs[start : start + inputs.shape[0]])
                    start += inputs.shape[0]
            except Exception as exc:  # every caller of this batch gets the error
                for _, done in taken:
                    if not done.done():
                        done.set_exception(exc)


def batch_size(max_batch: int, in_flight: int, device: torch.device) -> int:
    """`processing.max_batch` resolved: 0 (auto) is the studies in flight on CUDA, 1 on the
    CPU; never more than the studies in flight (no more callers can be waiting)."""
    if max_batch == 0:
        max_batch = in_flight if device.type == "cuda" else 1
    return max(1, min(max_batch, in_flight))


def batched(forward: Forward, max_batch: int, max_wait_s: float = 0.005) -> Forward:
    """`forward` behind a Batcher when max_batch >= 2, else `forward` itself."""
    return Batcher(forward, max_batch, max_wait_s) if max_batch >= 2 else forward
