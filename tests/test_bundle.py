"""Classifier bundles: MONAI layout, validation, hashes, No Finding = 1 - max p, triage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cxrbatch.domain import Triage
from cxrbatch.errors import ModelError
from cxrbatch.models.bundle import load_bundle
from tests.conftest import make_tiny_bundle


def test_bundle_layout_and_metadata(tiny_bundles: dict[str, Path]) -> None:
    root = tiny_bundles["screening"]
    metadata = json.loads((root / "configs" / "metadata.json").read_text())
    assert (root / "models" / "model.pt").is_file()
    assert metadata["cxrbatch"]["mask_mode"] == "M-50"
    assert metadata["cxrbatch"]["training_data"]["synthetic"] is True
    assert metadata["network_data_format"]["outputs"]["pred"]["channel_def"]["0"] == "Mass"
    bundle = load_bundle(root, "cpu")
    assert bundle.model.synthetic_training_data
    assert bundle.model.sha256 == metadata["model_sha256"]


def test_no_finding_score_and_triage(tiny_bundles: dict[str, Path]) -> None:
    bundle = load_bundle(tiny_bundles["screening"], "cpu")
    low = bundle.findings(np.array([0.1, 0.2, 0.05, 0.3, 0.1]))
    assert low.no_finding_score == pytest.approx(0.7)
    assert low.triage is Triage.LIKELY_NORMAL
    high = bundle.findings(np.array([0.1, 0.9, 0.05, 0.3, 0.1]))
    assert high.no_finding_score == pytest.approx(0.1)
    assert high.triage is Triage.ABNORMAL
    plain = load_bundle(tiny_bundles["classifier"], "cpu").findings(np.zeros(5))
    assert plain.triage is None and plain.no_finding_score == 1.0


def test_predict_gives_probabilities(tiny_bundles: dict[str, Path]) -> None:
    bundle = load_bundle(tiny_bundles["classifier"], "cpu")
    rng = np.random.default_rng(0)
    probs = bundle.predict(rng.standard_normal((2, 3, 64, 64)).astype(np.float32))
    assert probs.shape == (2, 5)
    assert ((probs >= 0) & (probs <= 1)).all()


def test_missing_and_corrupt_bundles_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"lacks configs/metadata\.json"):
        load_bundle(tmp_path / "nothing", "cpu")
    root = make_tiny_bundle(tmp_path / "b")
    with (root / "models" / "model.pt").open("ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(ModelError, match="SHA-256"):
        load_bundle(root, "cpu")
    root = make_tiny_bundle(tmp_path / "c")
    meta = root / "configs" / "metadata.json"
    document = json.loads(meta.read_text())
    document["cxrbatch"]["mask_mode"] = "M-99"
    meta.write_text(json.dumps(document))
    with pytest.raises(ModelError, match="Invalid bundle metadata"):
        load_bundle(root, "cpu")


def test_the_network_holds_exactly_the_files_tensors(tmp_path: Path) -> None:
    """The network is built without initialising weights it then replaces (the meta
    device): every tensor is the file's, and a file short of one is refused by name."""
    import torch

    root = make_tiny_bundle(tmp_path / "b")
    weights = root / "models" / "model.pt"
    state = torch.load(weights, map_location="cpu", weights_only=True)
    loaded = load_bundle(root, "cpu").network.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert not any(t.is_meta for t in loaded.values())
    missing = next(k for k in state if k.endswith("bias"))
    torch.save({k: v for k, v in state.items() if k != missing}, weights)
    meta = root / "configs" / "metadata.json"
    document = json.loads(meta.read_text())
    document.pop("model_sha256", None)  # the file changed on purpose
    meta.write_text(json.dumps(document))
    with pytest.raises(ModelError, match="does not match a") as refused:
        load_bundle(root, "cpu")
    assert missing in str(refused.value)
