"""Each network on each CPU engine, in one process, in alternating order: what chooses
the default engine per network (cxrbatch/models/engines.py DEFAULTS).

    python -m bench.engines [--rounds 5] [--repeats 3] [--threads 2] [--json F]

Networks: LiteMedSAM's image encoder (on RG1's decoded film, as the pipeline prepares
it), one mask-decoder pass with RG1's two lung boxes, and the two classifier
architectures at 512 px (random weights cost what trained ones do). Engines: "torch"
is today's tuned path (the encoder's split TorchScript graphs, the eager decoder, the
classifiers' fused graphs), then OpenVINO and ONNX Runtime as the product converts them
(engines.compile_network). Each round runs every engine on a network once (best of
--repeats calls after a warm-up), the engines' order reversed every other round; the
figure is the median over rounds, with the range. Accuracy against torch fp32 eager: the
largest probability difference, and for the segmenter the mask Dice on RG1. Each
network's work (torch's FLOP counter) over its median time gives GFLOP/s, printed as a
share of the fp32 GEMM rate measured in the same run (bench/peak.py, 4096^3, before and
after the networks; the higher of the two). An engine whose package is not installed is
left out.
"""

from __future__ import annotations

import argparse
import json
import statistics
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.peak import best_seconds, measure
from cxrbatch.models import engines
from cxrbatch.models.bundle import build_network
from cxrbatch.models.graphs import cpu_inference_graph, image_shape


def _rg1() -> tuple[np.ndarray, np.ndarray]:
    """RG1's segmentation input and the two boxes the product's prompts find on it."""
    from bench.seg_sets import rg1_cases
    from cxrbatch.models.prompts import WORK_SIZE, lung_boxes, working_copy

    image = rg1_cases()[0].image
    pixels = image.for_segmentation
    thorax = lung_boxes(working_copy(pixels))
    scale = WORK_SIZE / max(pixels.shape)
    boxes = np.array(
        [[v / scale for v in thorax.boxes[s]] for s in ("image_left", "image_right")],
        dtype=np.float32,
    )
    return pixels, boxes


def segmenter_networks() -> dict[str, dict[str, Any]]:
    """The encoder's and the decoder's callables per engine, with their inputs and what
    torch fp32 eager gives."""
    from cxrbatch.models.segmenter import LiteMedSAM

    eager = LiteMedSAM(device="cpu", optimize_cpu=False)
    tuned = LiteMedSAM(device="cpu", optimize_cpu=True, engines=("torch", "torch"))
    pixels, boxes = _rg1()
    prepared = eager.prepare(pixels)
    scale = np.array([*prepared.scale_xy, *prepared.scale_xy], dtype=np.float32)
    prompts = torch.as_tensor(boxes * scale)
    with torch.inference_mode():
        features = eager._net.image_encoder(prepared.batch)
    encoder: dict[str, Any] = {"torch": tuned._encoder}
    decoder: dict[str, Any] = {"torch": tuned._decoder}
    digest = eager.model.sha256
    for engine in ("openvino", "onnxruntime"):
        if not engines.available(engine):
            continue
        encoder[engine] = engines.compile_network(
            eager._net.image_encoder, (prepared.batch,), engine, "encoder", None, digest
        )
        decoder[engine] = engines.compile_network(
            eager._decoder, (features, prompts), engine, "decoder", None, digest,
            dynamic={"input1": 0, "logits": 0, "iou": 0}, output_names=("logits", "iou"),
        )  # fmt: skip
    return {
        "segmenter encoder": {
            "engines": encoder,
            "inputs": (prepared.batch,),
            "reference": lambda f: f,
            "eager": eager._net.image_encoder,
            "decoder": eager._decoder,
            "prompts": prompts,
        },
        "segmenter decoder": {
            "engines": decoder,
            "inputs": (features, prompts),
            "eager": eager._decoder,
        },
    }


def classifier_networks() -> dict[str, dict[str, Any]]:
    networks = {}
    for architecture in ("resnet50", "densenet121"):
        torch.manual_seed(0)
        net = build_network(architecture, 5).eval()
        shape = image_shape(512)
        table: dict[str, Any] = {
            "torch": cpu_inference_graph(net, shape, architecture, fuse=True),
        }
        for engine in ("openvino", "onnxruntime"):
            if engines.available(engine):
                table[engine] = engines.compile_network(
                    net, (torch.zeros(shape),), engine, architecture,
                    dynamic={"input0": 0, "output": 0},
                )  # fmt: skip
        probe = torch.rand(shape, generator=torch.Generator().manual_seed(1))
        networks[f"classifier {architecture}"] = {
            "engines": table,
            "inputs": (probe,),
            "eager": net,
        }
    return networks


def _gflop(spec: dict[str, Any]) -> float:
    """The network's work on its inputs, counted by torch (multiply-adds count 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        spec["eager"](*spec["inputs"])
    return counter.get_total_flops() / 1e9


def _accuracy(name: str, spec: dict[str, Any], engine: str) -> dict[str, float]:
    run = spec["engines"][engine]
    with torch.inference_mode():
        if name == "segmenter encoder":
            # Through the eager decoder: what the encoder's difference does to the masks.
            decode = spec["decoder"]
            reference = torch.sigmoid(decode(spec["eager"](*spec["inputs"]), spec["prompts"])[0])
            candidate = torch.sigmoid(decode(run(*spec["inputs"]), spec["prompts"])[0])
        elif name == "segmenter decoder":
            reference = torch.sigmoid(spec["eager"](*spec["inputs"])[0])
            candidate = torch.sigmoid(run(*spec["inputs"])[0])
        else:
            reference = torch.sigmoid(spec["eager"](*spec["inputs"]))
            candidate = torch.sigmoid(run(*spec["inputs"]))
    result = {"max_dp": engines.largest_difference(reference, candidate)}
    if name.startswith("segmenter"):
        a, b = reference > 0.5, candidate > 0.5
        result["mask_dice"] = 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    peak_before = measure()
    networks = {**segmenter_networks(), **classifier_networks()}
    report: dict[str, Any] = {"threads": args.threads, "rounds": args.rounds, "networks": {}}
    work = {name: _gflop(spec) for name, spec in networks.items()}
    for name, spec in networks.items():
        table = {e: f for e, f in spec["engines"].items() if f is not None}
        order = list(table)
        seconds: dict[str, list[float]] = {e: [] for e in order}
        with torch.inference_mode():
            for round_ in range(args.rounds):
                for engine in order if round_ % 2 == 0 else order[::-1]:
                    call = partial(table[engine], *spec["inputs"])
                    seconds[engine].append(best_seconds(call, args.repeats))
        base = statistics.median(seconds["torch"])
        rows = {}
        for engine in order:
            median = statistics.median(seconds[engine])
            rows[engine] = {
                "median_s": round(median, 4),
                "range_s": [round(min(seconds[engine]), 4), round(max(seconds[engine]), 4)],
                "speedup_vs_torch": round(base / median, 3),
                **({} if engine == "torch" else _accuracy(name, spec, engine)),
            }
            row = rows[engine]
            accuracy = "" if engine == "torch" else f", max dp {row['max_dp']:.1e}"
            if "mask_dice" in row:
                accuracy += f", mask Dice {row['mask_dice']:.4f}"
            print(
                f"{name:>24} {engine:>12}: {median:.3f} s "
                f"({min(seconds[engine]):.3f}-{max(seconds[engine]):.3f}), "
                f"{base / median:.2f}x torch{accuracy}",
                flush=True,
            )
        fastest = min(
            (
                e
                for e in order
                if e == "torch" or rows[e]["max_dp"] <= engines.PROBABILITY_TOLERANCE
            ),
            key=lambda e: rows[e]["median_s"],
        )
        rows["fastest_within_tolerance"] = fastest  # type: ignore[assignment]
        report["networks"][name] = rows
    peak_after = measure()
    peak = max(float(peak_before["gemm_4096_gflops"]), float(peak_after["gemm_4096_gflops"]))  # type: ignore[arg-type]
    report["peak"] = {"before": peak_before, "after": peak_after, "gemm_gflops": peak}
    print(f"fp32 GEMM peak in this run: {peak:.0f} GFLOP/s (4096^3, {args.threads} threads)")
    for name, rows in report["networks"].items():
        for engine, row in rows.items():
            if not isinstance(row, dict):
                continue
            row["gflop"] = round(work[name], 2)
            row["gflops"] = round(work[name] / row["median_s"], 1)
            row["share_of_peak"] = round(row["gflops"] / peak, 3)
            print(
                f"{name:>24} {engine:>12}: {work[name]:.1f} GFLOP, {row['gflops']:.0f} GFLOP/s, "
                f"{row['share_of_peak']:.0%} of the GEMM peak"
            )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
