"""Throughput harness: the full pipeline as `cxrbatch process` runs it, naive vs tuned.

    bench/run --studies N [--gpu] [--workers W] [--codec uncompressed|j2k|mixed]
              [--min-size 2000 --max-size 3000] [--rounds R] [--report FILE]

Generates N synthetic chest studies (12-16 bit, 2000-3000 px by default), two random-weight
classifier bundles at 512 px (ResNet50 M-15 classifier, DenseNet121 M-50 screening, so the
classifier stage costs what real ones would), then runs in one go, each in a fresh process:

- naive: one process, one image at a time, each stage in sequence with each library's
  defaults (torch's default threads, eager fp32 modules);
- tuned: W worker processes (models loaded once per worker, CPU threads split between
  them), each with T studies in flight on threads sharing its models
  (`processing.study_threads`), so decoding and writing of one study overlap the networks
  of another; on the CPU the networks run as frozen TorchScript graphs, loaded from the
  graph cache (processing.graph_cache_dir, filled untimed before the run, as a site's first
  run leaves it; `--graph-cache cold` times the tracing instead); malloc keeping freed
  memory for reuse (`processing.keep_freed_memory`); on GPU channels_last for the
  classifiers (and with --bf16 their bf16 autocast).

Both write SEG + SR + JSON and record to their own SQLite database. The outputs are
compared (lung mask Dice, probability differences). Prints studies/s, per-stage shares,
peak memory (RSS and GPU), and last `speedup_vs_naive: X.XX`; writes a JSON report. With
`--rounds R` both run R times in alternating order and the ratio is the median of the
rounds' ratios: on a shared machine one pair of runs can be off by 20 % or more.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrbatch.cpus import usable_cpus

if TYPE_CHECKING:
    from cxrbatch.config import Settings

STAGES = ("decode", "segment", "classify", "write")


def _one_thread() -> None:
    """A generating process's OpenCV on one thread: the pool has a process per core, and
    each blurring its film on every core made generation on a 16-core GPU host take
    longer than the runs it feeds (the films are the same either way)."""
    import cv2

    cv2.setNumThreads(1)


def _generate(args: tuple[Path, int, int, int, str, int]) -> None:
    from cxrbatch_training.synthetic import write_study

    out, index, rows, cols, syntax, bits = args
    write_study(
        out,
        index,
        seed=77,
        size=(rows, cols),
        transfer_syntax=syntax,
        bits=bits,
        monochrome="MONOCHROME1" if index % 2 else "MONOCHROME2",
    )


def _copy_study(args: tuple[Path, int, int]) -> None:
    """Study `index` as a copy of study `source` under new UIDs and a new patient: the
    same pixels (its codec's bytes as they are), a study the queue has never seen."""
    import pydicom
    from pydicom.uid import generate_uid

    folder, source, index = args
    ds = pydicom.dcmread(folder / f"phantom_{source:05d}" / "image.dcm")
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID = f"SYN-COPY-{index:05d}"
    out = folder / f"phantom_{index:05d}" / "image.dcm"
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)


def generate(
    folder: Path,
    count: int,
    min_size: int,
    max_size: int,
    codec: str,
    processes: int,
    distinct: int | None = None,
) -> None:
    """`count` phantom studies in `folder`. With `distinct`, only that many are drawn
    (a 2,500 px phantom costs about 3 s of a core) and the rest are copies of them under
    new UIDs: for a throughput run on a lent GPU host whose minutes are counted, where
    generating 256 drawn studies took longer than the runs they fed."""
    drawn = min(count, distinct or count)
    rng = np.random.default_rng(2026)
    jobs = []
    for index in range(drawn):
        rows, cols = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
        syntax = {"uncompressed": "explicit", "j2k": "j2k"}.get(codec) or (
            "explicit" if index % 2 == 0 else "j2k"
        )
        jobs.append((folder, index, rows, cols, syntax, (12, 14, 16)[index % 3]))
    # Spawned, not forked: a fork of a process whose threads hold locks (torch's, a test
    # runner's) can leave the child waiting on a lock no thread will release.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=spawn, initializer=_one_thread) as pool:
        list(pool.map(_generate, jobs))
        copies = [(folder, index % drawn, index) for index in range(drawn, count)]
        list(pool.map(_copy_study, copies, chunksize=8))


def make_bundles(folder: Path) -> dict[str, str]:
    import torch

    from cxrbatch.models.bundle import (
        BundleSpec,
        Screening,
        TrainingData,
        build_network,
        save_bundle,
    )

    torch.manual_seed(0)
    paths = {}
    for role, arch, mode, threshold in (
        ("bundle", "resnet50", "M-15", None),
        ("screening_bundle", "densenet121", "M-50", 0.5),
    ):
        spec = BundleSpec(
            architecture=arch,
            input_size=512,
            mask_mode=mode,
            screening=Screening(no_finding_threshold=threshold) if threshold else None,
            training_data=TrainingData(
                description="random weights, benchmark only", synthetic=True
            ),
        )
        save_bundle(folder / role, build_network(arch, 5), f"bench-{arch}", "0", spec, "bench")
        paths[role] = str(folder / role)
    return paths


def mode_settings(
    mode: str,
    bundles: dict[str, str],
    device: str,
    study_threads: int,
    bf16: bool,
    graph_cache: Path,
) -> Settings:
    """The settings of the naive or the tuned run."""
    from cxrbatch.config import load_settings

    naive = mode == "naive"
    return load_settings(
        None,
        # frozen TorchScript graphs on the CPU: tuned only
        segmentation={"device": device, "optimize_cpu": not naive},
        classifier={
            "device": device,
            "precision": "fp32" if naive or not bf16 else "auto",
            "optimize_cpu": not naive,
            **bundles,
        },
        processing={
            "study_threads": 1 if naive else study_threads,
            "graph_cache_dir": str(graph_cache),
            "keep_freed_memory": not naive,  # malloc's defaults in the naive run
        },
    )


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole host has been busy since boot (/proc/stat: user, nice, system,
    irq, softirq, steal), or None off Linux. On a host given to the benchmark (a lent GPU
    machine) this is the benchmark's cost, worker processes included, over any interval."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run_mode(
    mode: str,
    input_dir: Path,
    out_dir: Path,
    bundles: dict[str, str],
    device: str,
    workers: int,
    study_threads: int,
    bf16: bool,
    graph_cache: Path,
) -> dict[str, Any]:
    """Run one configuration in this (fresh) process; returns its measurements."""
    import resource

    import torch

    from cxrbatch import logs
    from cxrbatch.allocator import keep_freed_memory
    from cxrbatch.batch import run_batch
    from cxrbatch.cpus import threads_per_worker
    from cxrbatch.site import Site

    logs.configure("WARNING")
    naive = mode == "naive"
    settings = mode_settings(mode, bundles, device, study_threads, bf16, graph_cache)
    precision = settings.classifier.precision
    if naive:
        workers, study_threads = 1, 1
    if settings.processing.keep_freed_memory:  # as StudyProcessor does, before any threads
        keep_freed_memory()
    start = time.perf_counter()
    models = None
    if workers <= 1:  # in this process: the model loading (CPU graph tracing) timed apart
        from cxrbatch.pipeline import load_models

        models = load_models(settings, in_flight=study_threads)
    load_s = time.perf_counter() - start
    finished: list[float] = []  # when each study's report came back, in this process
    busy: list[float | None] = []  # the host's busy CPU seconds then

    def mark() -> None:
        finished.append(time.perf_counter())
        busy.append(busy_cpu_seconds())

    summary = run_batch(
        input_dir,
        Site.at(settings, out_dir),
        workers=workers,
        models=models,
        on_study=lambda *_: mark(),
    )
    wall = time.perf_counter() - start
    reports = summary.reports
    # CPU seconds of this process and its (joined) worker processes: what a study costs the
    # host's cores, model loading included; spinning waits count here, sleeping ones not.
    cpu_s = sum(
        u.ru_utime + u.ru_stime
        for u in (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
    )
    first_busy, last_busy = (busy[0], busy[-1]) if len(busy) > 2 else (None, None)
    stage_seconds = {s: float(sum(r.timings.get(s, 0.0) for r in reports)) for s in STAGES}
    # Each worker reports its own peak; the naive run's peak is this process's.
    own_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    worker_peaks: dict[int, int] = {}
    for r in reports:
        worker_peaks[r.worker_pid] = max(worker_peaks.get(r.worker_pid, 0), r.peak_rss_bytes)
    return {
        "mode": mode,
        "workers": workers,
        "study_threads": study_threads,
        "torch_threads": (torch.get_num_threads() if naive else threads_per_worker(workers)),
        "precision": precision,
        "studies": len(reports),
        "statuses": dict(summary.studies),
        "wall_s": wall,
        "studies_per_s": len(reports) / wall,
        # From the first study finished to the last: the rate once every worker has loaded
        # its models (worker processes load theirs in parallel, untimed apart).
        "steady_studies_per_s": (
            (len(finished) - 1) / (finished[-1] - finished[0])
            if len(finished) > 2 and finished[-1] > finished[0]
            else None
        ),
        # Seconds to load the models (and trace the CPU graphs), in the wall time; known
        # for one in-process worker, None where worker processes load their own.
        "load_s": load_s if models is not None else None,
        "stage_seconds_per_study": {s: v / max(len(reports), 1) for s, v in stage_seconds.items()},
        "cpu_s_per_study": cpu_s / max(len(reports), 1),
        # The host's busy CPU seconds per study from the first study done to the last (all
        # processes on the host: meaningful on a host given to the benchmark).
        "host_busy_cpu_s_per_study_steady": (
            (last_busy - first_busy) / (len(busy) - 1)
            if first_busy is not None and last_busy is not None
            else None
        ),
        "peak_rss_bytes_total": (
            own_rss
            if naive
            else own_rss + sum(p for pid, p in worker_peaks.items() if pid != os.getpid())
        ),
        "peak_rss_bytes_per_worker": sorted(worker_peaks.values()),
        "peak_gpu_bytes_per_worker": max((r.peak_gpu_bytes for r in reports), default=0),
    }


def run_child(command: list[str], what: str) -> dict[str, Any]:
    """Run one measurement in a fresh process; its result is its `RESULT {json}` line."""
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{what} failed (exit {proc.returncode})")
    result: dict[str, Any] = json.loads(line[len("RESULT ") :])
    return result


def compare(naive_out: Path, tuned_out: Path) -> dict[str, float]:
    """Lung mask Dice and probability differences between the two runs' outputs."""
    import highdicom as hd

    dices: list[float] = []
    prob_diffs: list[float] = []
    for result in sorted(naive_out.glob("*/result.json")):
        other = tuned_out / result.parent.name / "result.json"
        a, b = json.loads(result.read_text()), json.loads(other.read_text())
        for image_a, image_b in zip(a["images"], b["images"], strict=True):
            seg_a = hd.seg.segread(result.parent / image_a["seg_file"])
            seg_b = hd.seg.segread(other.parent / image_b["seg_file"])
            uid = image_a["sop_instance_uid"]
            pa = seg_a.get_pixels_by_source_instance([uid], combine_segments=False)[0]
            pb = seg_b.get_pixels_by_source_instance([uid], combine_segments=False)[0]
            for k in range(pa.shape[-1]):
                ma, mb = pa[..., k].astype(bool), pb[..., k].astype(bool)
                dices.append(2 * (ma & mb).sum() / max(ma.sum() + mb.sum(), 1))
            for role in ("findings", "screening"):
                fa, fb = image_a[role], image_b[role]
                if fa and fb:
                    prob_diffs.extend(
                        abs(fa["probabilities"][k] - fb["probabilities"][k])
                        for k in fa["probabilities"]
                    )
                    prob_diffs.append(abs(fa["no_finding_score"] - fb["no_finding_score"]))
    return {
        "images_compared": len(dices) // 2,
        "mask_dice_min": float(min(dices)) if dices else float("nan"),
        "probability_abs_diff_max": float(max(prob_diffs)) if prob_diffs else float("nan"),
    }


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of the rounds' ratios (end to end and after loading), their range, and
    the runs of the median round (the lower middle one for an even count)."""
    speedups = [r["speedup_vs_naive"] for r in rounds]
    after_loads = [r["speedup_after_load"] for r in rounds]
    median_round = sorted(rounds, key=lambda r: r["speedup_vs_naive"])[(len(rounds) - 1) // 2]
    return {
        "speedup_vs_naive": statistics.median(speedups),
        "speedup_after_load": None if None in after_loads else statistics.median(after_loads),
        "speedup_range": [min(speedups), max(speedups)],
        "runs": median_round["runs"],
    }


def _gb(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def print_run(label: str, r: dict[str, Any], cache_state: str | None) -> None:
    shares = r["stage_seconds_per_study"]
    total = sum(shares.values()) or 1.0
    print(
        f"{label}: {r['studies']} studies in {r['wall_s']:.1f}s = "
        f"{r['studies_per_s']:.2f} studies/s"
        + (f" (models loaded in {r['load_s']:.1f}s)" if r["load_s"] is not None else "")
        + (
            f", {r['steady_studies_per_s']:.2f} studies/s from the first study done to the last"
            if r.get("steady_studies_per_s")
            else ""
        )
        + (f", graph cache {cache_state}" if cache_state else "")
        + f", workers {r['workers']} x "
        f"{r['study_threads']} in flight, torch threads/worker {r['torch_threads']}, "
        f"peak RSS {_gb(r['peak_rss_bytes_total'])}"
        + (f", CPU {r['cpu_s_per_study']:.2f} s/study" if "cpu_s_per_study" in r else "")
        + (
            f" ({r['host_busy_cpu_s_per_study_steady']:.2f} s steady, host-wide)"
            if r.get("host_busy_cpu_s_per_study_steady") is not None
            else ""
        )
        + f", GPU peak/worker {_gb(r['peak_gpu_bytes_per_worker'])}",
        flush=True,
    )
    print(
        "       per study: "
        + ", ".join(f"{s} {v:.3f}s ({100 * v / total:.0f}%)" for s, v in shares.items()),
        flush=True,
    )


def ratios(runs: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Naive wall time over tuned, end to end and without each run's model loading
    (known where both loaded in process)."""
    naive, tuned = runs["naive"], runs["tuned"]
    after_load = None
    if naive["load_s"] is not None and tuned["load_s"] is not None:
        after_load = (naive["wall_s"] - naive["load_s"]) / (tuned["wall_s"] - tuned["load_s"])
    return {"speedup_vs_naive": naive["wall_s"] / tuned["wall_s"], "speedup_after_load": after_load}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=16)
    parser.add_argument("--gpu", action="store_true", help="run the models on CUDA")
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="tuned worker processes (default: 1 on CPU, min(CPU count, 16) on GPU)",
    )
    parser.add_argument(
        "--study-threads",
        type=int,
        default=2,
        help="tuned: studies in flight per worker process (processing.study_threads)",
    )
    parser.add_argument("--codec", choices=("uncompressed", "j2k", "mixed"), default="uncompressed")
    parser.add_argument(
        "--distinct",
        type=int,
        default=None,
        help="draw only this many phantoms; the other studies are copies under new UIDs",
    )
    parser.add_argument("--min-size", type=int, default=2000)
    parser.add_argument("--max-size", type=int, default=3000)
    parser.add_argument("--report", type=Path, default=None, help="JSON report path")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="naive and tuned this many times, alternating their order; the ratio printed"
        " last is the median of the rounds' ratios (shared machines are noisy)",
    )
    parser.add_argument(
        "--bf16", action="store_true", help="tuned run: bf16 autocast for the classifiers on CUDA"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep data here; its studies are reused by a later run with the same recipe",
    )
    parser.add_argument(
        "--graph-cache",
        choices=("warm", "cold"),
        default="warm",
        help="tuned on the CPU: its graph cache (processing.graph_cache_dir) filled before"
        " timing, as on a site after its first run (warm, default), or empty (cold: the"
        " tracing is timed, as on a first run)",
    )
    parser.add_argument("--mode", choices=("naive", "tuned", "prepare"), help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--bundles", type=str, help=argparse.SUPPRESS)
    parser.add_argument("--graph-cache-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = "cuda" if args.gpu else "cpu"
    cpus = usable_cpus()  # the CPUs this process may use (affinity), as the workers count them
    workers = args.workers or (min(cpus, 16) if args.gpu else 1)

    if args.mode == "prepare":  # a child process filling the tuned run's graph cache
        from cxrbatch.pipeline import load_models

        settings = mode_settings(
            "tuned",
            json.loads(args.bundles),
            device,
            args.study_threads,
            False,
            args.graph_cache_dir,
        )
        load_models(settings)
        print("RESULT {}")
        return
    if args.mode:  # a child process measuring one configuration
        result = run_mode(
            args.mode,
            args.input,
            args.out,
            json.loads(args.bundles),
            device,
            workers,
            args.study_threads,
            args.bf16,
            args.graph_cache_dir,
        )
        print("RESULT " + json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        started = time.perf_counter()
        marker = work / "generated.json"  # beside the input: discover() would reject it
        recipe = {
            "studies": args.studies,
            "sizes": [args.min_size, args.max_size],
            "codec": args.codec,
            "distinct": args.distinct,
        }
        if marker.is_file() and json.loads(marker.read_text()) == recipe:
            print(f"reusing the {args.studies} studies in {work / 'in'}", flush=True)
        else:  # a --workdir from an earlier run with the same recipe is reused
            generate(
                work / "in",
                args.studies,
                args.min_size,
                args.max_size,
                args.codec,
                cpus,
                args.distinct,
            )
            marker.write_text(json.dumps(recipe))
            print(
                f"generated {args.studies} studies ({args.min_size}-{args.max_size} px, "
                f"{args.codec}) in {time.perf_counter() - started:.1f}s",
                flush=True,
            )
        bundles = make_bundles(work / "bundles")
        graph_cache = work / "graph-cache"
        cache_state = "none (CUDA)" if args.gpu else args.graph_cache
        if args.graph_cache == "warm" and not args.gpu:  # untimed: as a first run leaves it
            prepare = [sys.executable, "-m", "bench.harness", "--mode", "prepare"]
            prepare += ["--graph-cache-dir", str(graph_cache), "--bundles", json.dumps(bundles)]
            run_child(prepare, "filling the graph cache")
        rounds = []
        for k in range(args.rounds):
            # Alternating the order spreads a noisy neighbour's bursts over both modes.
            order = ("naive", "tuned") if k % 2 == 0 else ("tuned", "naive")
            runs = {}
            for mode in order:
                shutil.rmtree(work / f"out-{mode}", ignore_errors=True)  # else skipped
                if mode == "tuned" and args.graph_cache == "cold":  # every round traces
                    shutil.rmtree(graph_cache, ignore_errors=True)
                command = [
                    sys.executable,
                    "-m",
                    "bench.harness",
                    "--mode",
                    mode,
                    "--input",
                    str(work / "in"),
                    "--out",
                    str(work / f"out-{mode}"),
                    "--bundles",
                    json.dumps(bundles),
                    "--workers",
                    str(workers),
                    "--study-threads",
                    str(args.study_threads),
                    "--graph-cache-dir",
                    str(graph_cache),
                ]
                command += ["--gpu"] if args.gpu else []
                command += ["--bf16"] if args.bf16 else []
                runs[mode] = run_child(command, f"{mode} run")
                label = f"{mode:>5}" + (
                    f" (round {k + 1}/{args.rounds})" if args.rounds > 1 else ""
                )
                print_run(label, runs[mode], cache_state if mode == "tuned" else None)
            rounds.append({**ratios(runs), "runs": runs})
            if args.rounds > 1:
                print(f"round {k + 1}: speedup {rounds[-1]['speedup_vs_naive']:.2f}", flush=True)
        agreement = compare(work / "out-naive", work / "out-tuned")
        print(f"agreement: {json.dumps(agreement)}")
        summary = summarise(rounds)
        speedup, after_load = summary["speedup_vs_naive"], summary["speedup_after_load"]
        if after_load is not None:
            print(f"speedup after model loading: {after_load:.2f}")
        if args.rounds > 1:
            low, high = summary["speedup_range"]
            print(
                f"speedup over {args.rounds} rounds: median {speedup:.2f}, "
                f"range {low:.2f}-{high:.2f}"
            )
        report = {
            "studies": args.studies,
            "device": device,
            "codec": args.codec,
            "sizes": [args.min_size, args.max_size],
            "cpu_count": cpus,
            "platform": platform.platform(),
            "runs": summary["runs"],
            "rounds": rounds,
            "speedup_range": summary["speedup_range"],
            "agreement": agreement,
            "speedup_vs_naive": speedup,
            "speedup_after_load": after_load,
            "graph_cache": cache_state,
        }
        try:
            import torch

            report["torch"] = torch.__version__
            if args.gpu:
                report["gpu"] = torch.cuda.get_device_name(0)
        except Exception:  # reporting only
            pass
        path = args.report or Path("bench") / "results" / f"bench-{device}-{int(time.time())}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        print(f"report: {path}")
        print(f"speedup_vs_naive: {speedup:.2f}")


if __name__ == "__main__":
    main()
