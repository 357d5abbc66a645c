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

"Ready" is what each engine costs a worker before its first answer, with the cache warm
(as on a site after its first run): the torch graph read back (and fused, where the
product fuses it) or the converted model read and compiled, then its first call; the
same alternating rounds (--ready-rounds), median and range. A worker pays it once per
network, so it decides between engines whose running times are within each other's
ranges.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.peak import best_seconds, measure
from cxrbatch.models import engines
from cxrbatch.models.bundle import Trunk, build_network, head
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


def segmenter_networks(cache: Path) -> dict[str, dict[str, Any]]:
    """The encoder's and the decoder's callables per engine, how each is made ready from
    `cache` (filled here), with their inputs and what torch fp32 eager gives."""
    from cxrbatch.models.segmenter import LiteMedSAM

    eager = LiteMedSAM(device="cpu", optimize_cpu=False)
    tuned = LiteMedSAM(device="cpu", optimize_cpu=True, engines=("torch", "torch"))
    pixels, boxes = _rg1()
    prepared = eager.prepare(pixels)
    scale = np.array([*prepared.scale_xy, *prepared.scale_xy], dtype=np.float32)
    prompts = torch.as_tensor(boxes * scale)
    with torch.inference_mode():
        features = eager._net.image_encoder(prepared.batch)
    digest = eager.model.sha256
    build_encoder: dict[str, Callable[[], Any]] = {
        "torch": lambda: tuned._cpu_encoder(cache, digest)
    }
    build_decoder: dict[str, Callable[[], Any]] = {"torch": lambda: tuned._decoder}  # eager
    for engine in ("openvino", "onnxruntime"):
        if not engines.available(engine):
            continue
        build_encoder[engine] = partial(
            engines.compile_network, eager._net.image_encoder, (prepared.batch,), engine,
            "encoder", cache, digest,
        )  # fmt: skip
        build_decoder[engine] = partial(
            engines.compile_network, eager._decoder, (features, prompts), engine, "decoder",
            cache, digest, dynamic={"input1": 0, "logits": 0, "iou": 0},
            output_names=("logits", "iou"),
        )  # fmt: skip
    encoder = {engine: build() for engine, build in build_encoder.items()}
    decoder = {engine: build() for engine, build in build_decoder.items()}
    return {
        "segmenter encoder": {
            "engines": encoder,
            "build": build_encoder,
            "inputs": (prepared.batch,),
            "reference": lambda f: f,
            "eager": eager._net.image_encoder,
            "decoder": eager._decoder,
            "prompts": prompts,
        },
        "segmenter decoder": {
            "engines": decoder,
            "build": build_decoder,
            "inputs": (features, prompts),
            "eager": eager._decoder,
        },
    }


def classifier_networks(cache: Path) -> dict[str, dict[str, Any]]:
    """Each classifier as the product runs it: its trunk on the engine (the CPU graph or a
    converted model), then the pooling and linear head in torch (bundle.head)."""
    networks = {}
    for architecture in ("resnet50", "densenet121"):
        torch.manual_seed(0)
        net = build_network(architecture, 5).eval()
        trunk = Trunk(net)
        shape = image_shape(512)
        digest = f"bench-{architecture}"  # the cache key's weights part: the seed's weights
        build: dict[str, Callable[[], Any]] = {
            "torch": partial(
                cpu_inference_graph, trunk, shape, architecture, cache, digest, fuse=True
            ),
        }
        for engine in ("openvino", "onnxruntime"):
            if engines.available(engine):
                build[engine] = partial(
                    engines.compile_network, trunk, (torch.zeros(shape),), engine, architecture,
                    cache, digest, dynamic={"input0": 0, "output": 0},
                )  # fmt: skip
        build = {engine: partial(_with_head, net, make) for engine, make in build.items()}
        probe = torch.rand(shape, generator=torch.Generator().manual_seed(1))
        networks[f"classifier {architecture}"] = {
            "engines": {engine: make() for engine, make in build.items()},
            "build": build,
            "inputs": (probe,),
            "eager": net,
        }
    return networks


def _with_head(network: torch.nn.Module, make: Callable[[], Any]) -> Callable[..., Any]:
    """The trunk `make` gives, followed by the network's head: logits, as the product's
    ClassifierBundle.evaluate makes them."""
    trunk = make()
    return lambda batch: head(network, trunk(batch))


def _ready_seconds(spec: dict[str, Any], engine: str) -> float:
    """From the warm cache to the first answer: the engine's model made ready, called once."""
    started = time.perf_counter()
    run = spec["build"][engine]()
    with torch.inference_mode():
        run(*spec["inputs"])
    return time.perf_counter() - started


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


def _alternating(order: list[str], rounds: int) -> Iterator[str]:
    """The engines of `rounds` rounds, in `order` and reversed every other round."""
    for round_ in range(rounds):
        yield from order if round_ % 2 == 0 else order[::-1]


def _ready(networks: dict[str, dict[str, Any]], rounds: int) -> dict[str, dict[str, list[float]]]:
    """Each network's ready seconds per engine over `rounds`, the order reversed every
    other round (the cache already warm: every engine's model was made once)."""
    ready: dict[str, dict[str, list[float]]] = {}
    for name, spec in networks.items():
        order = [e for e, f in spec["engines"].items() if f is not None]
        ready[name] = {e: [] for e in order}
        for engine in _alternating(order, rounds):
            ready[name][engine].append(_ready_seconds(spec, engine))
    return ready


def _run(
    networks: dict[str, dict[str, Any]],
    rounds: int,
    repeats: int,
    ready: dict[str, dict[str, list[float]]],
) -> dict[str, Any]:
    """Each network's running time per engine (best of `repeats` per round, alternating
    order), accuracy against torch fp32 eager and the ready seconds."""
    work = {name: _gflop(spec) for name, spec in networks.items()}
    report: dict[str, Any] = {"rounds": rounds, "networks": {}}
    for name, spec in networks.items():
        table = {e: f for e, f in spec["engines"].items() if f is not None}
        order = list(table)
        seconds: dict[str, list[float]] = {e: [] for e in order}
        with torch.inference_mode():
            for engine in _alternating(order, rounds):
                call = partial(table[engine], *spec["inputs"])
                seconds[engine].append(best_seconds(call, repeats))
        base = statistics.median(seconds["torch"])
        rows: dict[str, dict[str, Any]] = {}
        for engine in order:
            median = statistics.median(seconds[engine])
            rows[engine] = {
                "median_s": round(median, 4),
                "range_s": [round(min(seconds[engine]), 4), round(max(seconds[engine]), 4)],
                "speedup_vs_torch": round(base / median, 3),
                "ready_median_s": round(statistics.median(ready[name][engine]), 3),
                "ready_range_s": [
                    round(min(ready[name][engine]), 3),
                    round(max(ready[name][engine]), 3),
                ],
                **({} if engine == "torch" else _accuracy(name, spec, engine)),
            }
            row = rows[engine]
            accuracy = "" if engine == "torch" else f", max dp {row['max_dp']:.1e}"
            if "mask_dice" in row:
                accuracy += f", mask Dice {row['mask_dice']:.4f}"
            print(
                f"{name:>24} {engine:>12}: {median:.3f} s "
                f"({min(seconds[engine]):.3f}-{max(seconds[engine]):.3f}), "
                f"{base / median:.2f}x torch{accuracy}; ready in {row['ready_median_s']:.2f} s "
                f"({row['ready_range_s'][0]:.2f}-{row['ready_range_s'][1]:.2f})",
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
        rows["fastest_within_tolerance"] = fastest  # type: ignore[assignment,unused-ignore]
        report["networks"][name] = rows
    report["work_gflop"] = work
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ready-rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    peak_before = measure()
    with tempfile.TemporaryDirectory(prefix="cxrbatch-engines-") as folder:
        cache = Path(folder) / "cache"
        networks = {**segmenter_networks(cache), **classifier_networks(cache)}
        ready = _ready(networks, args.ready_rounds)
    report = _run(networks, args.rounds, args.repeats, ready)
    report["threads"] = args.threads
    peak_after = measure()
    peak = max(float(peak_before["gemm_4096_gflops"]), float(peak_after["gemm_4096_gflops"]))  # type: ignore[arg-type]
    report["peak"] = {"before": peak_before, "after": peak_after, "gemm_gflops": peak}
    print(f"fp32 GEMM peak in this run: {peak:.0f} GFLOP/s (4096^3, {args.threads} threads)")
    for name, rows in report["networks"].items():
        for engine, row in rows.items():
            if not isinstance(row, dict):
                continue
            work = report["work_gflop"][name]
            row["gflop"] = round(work, 2)
            row["gflops"] = round(work / row["median_s"], 1)
            row["share_of_peak"] = round(row["gflops"] / peak, 3)
            print(
                f"{name:>24} {engine:>12}: {work:.1f} GFLOP, {row['gflops']:.0f} GFLOP/s, "
                f"{row['share_of_peak']:.0%} of the GEMM peak"
            )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
