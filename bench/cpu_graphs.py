"""CPU inference graphs against eager modules: seconds per forward pass and the largest
output difference, for LiteMedSAM's encoder and the harness's two classifier networks.

    python -m bench.cpu_graphs [--threads 1] [--repeats 4]

"plain" is one frozen, optimize_for_inference graph; "fused" is what the pipeline runs:
oneDNN Graph fusion where its check passes (the classifiers whole; LiteMedSAM's encoder
as its fused convolutional head + its plain attention stages). Random-weight classifiers
(ResNet50, DenseNet121 at 512 px) cost what trained ones do.
"""

from __future__ import annotations

import argparse
import time

import torch

from cxrbatch.models.bundle import build_network
from cxrbatch.models.graphs import cpu_inference_graph, image_shape
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
    segmenter = LiteMedSAM(device="cpu")
    shape = image_shape(LiteMedSAM.input_size)
    networks = [
        (
            "LiteMedSAM encoder",
            segmenter.network.image_encoder,
            shape,
            lambda: segmenter._cpu_encoder(None, ""),
        ),
    ]
    for name, architecture in (("ResNet50", "resnet50"), ("DenseNet121", "densenet121")):
        network = build_network(architecture, 5).eval()
        networks.append(
            (
                name,
                network,
                image_shape(512),
                lambda n=network, w=name: cpu_inference_graph(n, image_shape(512), w, fuse=True),
            )
        )
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    for name, module, input_shape, build_fused in networks:
        module.eval()
        example = torch.rand(input_shape)
        start = time.perf_counter()
        plain = cpu_inference_graph(module, input_shape, name)
        plain_build_s = time.perf_counter() - start
        start = time.perf_counter()
        fused = build_fused()
        fused_build_s = time.perf_counter() - start
        eager_s = seconds_per_call(module, example, args.repeats)
        plain_s = seconds_per_call(plain, example, args.repeats)
        fused_s = seconds_per_call(fused, example, args.repeats)
        with torch.inference_mode():
            expected = module(example)
            diffs = [float((g(example) - expected).abs().max()) for g in (plain, fused)]
        print(
            f"{name}: eager {eager_s:.3f} s, plain graph {plain_s:.3f} s "
            f"({eager_s / plain_s:.2f}x), fused {fused_s:.3f} s ({eager_s / fused_s:.2f}x, "
            f"{plain_s / fused_s:.2f}x plain); building (tracing, no cache) plain "
            f"{plain_build_s:.1f} s, fused {fused_build_s:.1f} s; max |diff| plain "
            f"{diffs[0]:.1e}, fused {diffs[1]:.1e}"
        )


if __name__ == "__main__":
    main()
