"""CPU inference graphs against eager modules: seconds per forward pass and the largest
output difference, for LiteMedSAM's encoder and the harness's two classifier networks.

    python -m bench.cpu_graphs [--threads 1] [--repeats 4]

Random-weight classifiers (ResNet50, DenseNet121 at 512 px) cost what trained ones do.
"""

from __future__ import annotations

import argparse
import time

import torch

from cxrbatch.models.bundle import build_network
from cxrbatch.models.graphs import cpu_inference_graph
from cxrbatch.models.segmenter import LiteMedSAM


def seconds_per_call(module: torch.nn.Module, example: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        module(example)  # warm-up (the graph executor optimises on its first calls)
        module(example)
        start = time.perf_counter()
        for _ in range(repeats):
            module(example)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    networks = [
        (
            "LiteMedSAM encoder",
            LiteMedSAM(device="cpu").network.image_encoder,
            LiteMedSAM.input_size,
        ),
        ("ResNet50", build_network("resnet50", 5), 512),
        ("DenseNet121", build_network("densenet121", 5), 512),
    ]
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    for name, module, size in networks:
        module.eval()
        example = torch.rand(1, 3, size, size)
        start = time.perf_counter()
        graph = cpu_inference_graph(module, size, name)
        trace_s = time.perf_counter() - start
        eager_s = seconds_per_call(module, example, args.repeats)
        graph_s = seconds_per_call(graph, example, args.repeats)
        with torch.inference_mode():
            diff = float((graph(example) - module(example)).abs().max())
        print(
            f"{name}: eager {eager_s:.3f} s, graph {graph_s:.3f} s "
            f"({eager_s / graph_s:.2f}x), tracing {trace_s:.1f} s, max |diff| {diff:.1e}"
        )


if __name__ == "__main__":
    main()
