"""Batching across studies (cxrbatch/models/batching.py): concurrent calls are joined into
one forward pass, each caller gets its own rows, errors reach every caller of the batch,
and the pipeline gives the same results with it."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from cxrbatch import pipeline
from cxrbatch.batch import run_batch
from cxrbatch.config import Settings
from cxrbatch.errors import ConfigError
from cxrbatch.models.batching import Batcher, batch_size
from cxrbatch.models.segmenter import load_segmenter
from cxrbatch.site import Site
from cxrbatch_training.synthetic import write_studies


def test_concurrent_calls_share_one_pass_and_get_their_own_rows() -> None:
    seen: list[int] = []
    gate = threading.Barrier(4, timeout=10)

    def forward(batch: torch.Tensor) -> torch.Tensor:
        seen.append(batch.shape[0])
        return batch * 2 + 1

    batcher = Batcher(forward, max_batch=4, max_wait_s=5.0)

    def call(value: float) -> torch.Tensor:
        gate.wait()  # all four ask at about the same moment
        return batcher(torch.full((1, 3), value))

    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(call, [0.0, 1.0, 2.0, 3.0]))
    for value, output in zip([0.0, 1.0, 2.0, 3.0], outputs, strict=True):
        assert torch.equal(output, torch.full((1, 3), value * 2 + 1))
    assert seen == [4]  # one pass for four callers (the batch filled before the wait ended)
    assert batcher.batch_sizes == [4]


def test_a_lone_call_runs_after_the_wait_and_errors_reach_the_caller() -> None:
    def forward(batch: torch.Tensor) -> torch.Tensor:
        if (batch < 0).any():
            raise RuntimeError("CUDA out of memory (simulated)")
        return batch

    batcher = Batcher(forward, max_batch=8, max_wait_s=0.01)
    assert torch.equal(batcher(torch.ones(1, 2)), torch.ones(1, 2))
    with pytest.raises(RuntimeError, match="out of memory"):
        batcher(-torch.ones(1, 2))
    assert torch.equal(batcher(torch.zeros(2, 2)), torch.zeros(2, 2))  # still serving
    assert batcher.batch_sizes == [1, 2]


def test_batch_size_is_auto_on_cuda_only_and_bounded_by_studies_in_flight() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert batch_size(0, 4, cpu) == 1
    assert batch_size(0, 4, cuda) == 4
    assert batch_size(8, 3, cpu) == 3  # no more callers than studies in flight
    assert batch_size(1, 4, cuda) == 1
    with pytest.raises(ValueError):
        Batcher(lambda x: x, max_batch=1)


def test_pipeline_with_batched_networks_matches_unbatched(
    tmp_path: Path, classified_models: tuple[Settings, pipeline.Models]
) -> None:
    """Three studies in flight with encoder and classifier batches of up to three (forced
    on the CPU; the wait made long so that they do join) against one study at a time: the
    same masks and scores within float noise."""
    settings, models = classified_models
    write_studies(tmp_path / "in", 3, seed=31, size=(320, 320))
    # The session's segmenter is shared (not batched here), and its encoder is a CPU graph
    # traced for one image: batching needs the eager encoder, and says so.
    with pytest.raises(ConfigError, match="optimize_cpu = false"):
        models.segmenter.batch_encoder(3)
    eager = settings.segmentation.model_copy(update={"optimize_cpu": False})
    segmenter = load_segmenter(eager)
    segmenter.batch_encoder(3, max_wait_s=2.0)
    assert models.classifier is not None and models.screening is not None
    joined = pipeline.Models(
        segmenter,
        models.classifier.with_batching(3, max_wait_s=2.0),
        models.screening.with_batching(3, max_wait_s=2.0),
    )
    documents = {}
    for name, threads, used in (("plain", 1, models), ("joined", 3, joined)):
        configured = settings.model_copy(
            update={"processing": settings.processing.model_copy(update={"study_threads": threads})}
        )
        out = tmp_path / name
        summary = run_batch(tmp_path / "in", Site.at(configured, out), models=used)
        assert summary.studies == {"processed": 3}
        documents[name] = {
            p.parent.name: json.loads(p.read_text()) for p in out.glob("*/result.json")
        }
    for network in (segmenter._encode, joined.classifier.run, joined.screening.run):  # type: ignore[union-attr]
        assert isinstance(network, Batcher) and max(network.batch_sizes) >= 2, network
    assert documents["plain"].keys() == documents["joined"].keys()
    for uid, one in documents["plain"].items():
        other = documents["joined"][uid]
        for a, b in zip(one["images"], other["images"], strict=True):
            for side in ("right", "left"):
                assert a["lungs"][side]["area_fraction"] == pytest.approx(
                    b["lungs"][side]["area_fraction"], abs=1e-3
                )
            for role in ("findings", "screening"):
                for label, p in a[role]["probabilities"].items():
                    assert b[role]["probabilities"][label] == pytest.approx(p, abs=1e-4)


def test_load_models_batches_only_for_callers_with_studies_in_flight(settings: Settings) -> None:
    """The daemon's worker runs one study at a time: no pass of it may wait for company."""
    forced = settings.model_copy(
        update={
            "segmentation": settings.segmentation.model_copy(update={"optimize_cpu": False}),
            "processing": settings.processing.model_copy(update={"max_batch": 3}),
        }
    )
    alone = pipeline.load_models(forced)
    assert not isinstance(alone.segmenter._encode, Batcher)  # type: ignore[attr-defined]
    together = pipeline.load_models(forced, in_flight=3)
    encode = together.segmenter._encode  # type: ignore[attr-defined]
    assert isinstance(encode, Batcher) and encode.max_batch == 3
