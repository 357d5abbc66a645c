"""The fp32 rate this host actually reaches (issue 37): a large matrix product and a
ResNet-sized convolution through torch (oneDNN / MKL), at the thread count a worker uses,
best of R repeats after a warm-up. The stages in docs/performance.md are read as a share
of these figures, not of a datasheet's peak.

    python -m bench.peak [--threads 2] [--repeats 5]

Prints one JSON line: GFLOP/s of the GEMM (2048^3, and 4096^3) and of the convolution
(batch 8, 256 -> 256 channels, 3x3, 56x56), with the threads used.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable


def best_seconds(work: Callable[[], object], repeats: int) -> float:
    work()  # warm-up: allocation, kernel selection
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    print(json.dumps(measure(args.repeats)))
    return 0


def measure(repeats: int = 5) -> dict[str, object]:
    """GFLOP/s of the GEMMs and the convolution at torch's current thread count."""
    import torch

    report: dict[str, object] = {"threads": torch.get_num_threads()}
    with torch.inference_mode():
        for n in (2048, 4096):
            a, b = torch.randn(n, n), torch.randn(n, n)
            seconds = best_seconds(lambda a=a, b=b: torch.mm(a, b), repeats)
            report[f"gemm_{n}_gflops"] = round(2 * n**3 / seconds / 1e9, 1)
        conv = torch.nn.Conv2d(256, 256, 3, padding=1).eval()
        x = torch.randn(8, 256, 56, 56)
        flops = 2 * 8 * 256 * 256 * 9 * 56 * 56
        seconds = best_seconds(lambda: conv(x), repeats)
        report["conv3x3_gflops"] = round(flops / seconds / 1e9, 1)
    return report


if __name__ == "__main__":
    sys.exit(main())
