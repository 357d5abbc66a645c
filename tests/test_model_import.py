"""Public trained weights in: a TorchXRayVision checkpoint, built by torchxrayvision itself
(random weights) and saved the way its release files are, imported with `cxrbatch bundle
import-torchxrayvision`, gives through `cxrbatch process` on the real film RG1 the
probabilities torchxrayvision's own forward gives with its own preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import torchxrayvision as xrv
from typer.testing import CliRunner

from cxrbatch.cli import app
from cxrbatch.dicom.decode import decode
from cxrbatch.dicom.discover import read_header
from cxrbatch.domain import FINDING_LABELS, InstanceHeader
from cxrbatch.models.bundle import load_bundle
from cxrbatch.models.importers import xrv_weights_file
from tests.conftest import real_file

RUNNER = CliRunner()


def _release_file(name: str, weights_dir: Path) -> Path:
    """A random-weight checkpoint at the path and in the form of the release file: the
    DenseNets are pickled whole torchxrayvision modules, the ResNet50 a state dict."""
    path, _ = xrv_weights_file(name, weights_dir)
    torch.manual_seed(7)
    if name.startswith("densenet"):
        model = xrv.models.DenseNet(num_classes=18)
        network, head = model, model.classifier
    else:
        network = torchvision.models.resnet50(num_classes=18)
        network.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        head = network.fc
    with torch.no_grad():  # spread the outputs: no probability stuck at 0 or 1
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        network.eval()
        size = 224 if name.startswith("densenet") else 512
        features = _features(network, torch.rand(1, 1, size, size) * 2048 - 1024)
        head.weight.normal_(0.0, 1.0).div_(features.norm())
        head.bias.uniform_(-1.0, 1.0)
    weights_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model if name.startswith("densenet") else network.state_dict(), path)
    return path


def _features(network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(network, xrv.models.DenseNet):
        return network.features2(x)
    head, network.fc = network.fc, torch.nn.Identity()
    try:
        return network(x)
    finally:
        network.fc = head


def _xrv_probabilities(name: str, weights_dir: Path, pixels: np.ndarray) -> np.ndarray:
    """torchxrayvision's own loading, preprocessing and forward (sigmoid, before op_norm)."""
    model = xrv.models.get_model(name, cache_dir=str(weights_dir))
    published = model.op_threshs
    model.op_threshs = None
    image = xrv.datasets.normalize(pixels, 255)[None, ...]
    transform = torchvision.transforms.Compose(
        [xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(model.input_resolution)]
    )
    batch = torch.from_numpy(transform(image))[None]
    with torch.no_grad():
        logits = model(batch)
        rescaled = xrv.models.op_norm(torch.sigmoid(logits), published)
    indices = [model.targets.index(label) for label in FINDING_LABELS]
    probabilities = torch.sigmoid(logits)[0, indices].numpy()
    return np.stack([probabilities, rescaled[0, indices].numpy()])


@pytest.mark.parametrize("name", ["densenet121-res224-nih", "resnet50-res512-all"])
def test_an_imported_torchxrayvision_model_gives_its_own_probabilities_on_rg1(
    tmp_path: Path, name: str
) -> None:
    weights = tmp_path / "weights"
    _release_file(name, weights)
    bundle = tmp_path / "bundle"
    result = RUNNER.invoke(
        app,
        [
            "bundle",
            "import-torchxrayvision",
            name,
            "--weights-dir",
            str(weights),
            "--out",
            str(bundle),
        ],
    )
    assert result.exit_code == 0, result.output
    loaded = load_bundle(bundle, "cpu")
    assert loaded.spec.labels == FINDING_LABELS and loaded.spec.in_channels == 1
    assert loaded.spec.mask_mode == "original" and not loaded.model.synthetic_training_data
    assert set(loaded.spec.thresholds) == set(FINDING_LABELS)  # its published op_threshs
    # The bundle holds a plain state dict: weights_only loading reads it.
    assert torch.load(bundle / "models" / "model.pt", weights_only=True)

    film = tmp_path / "in" / "rg1.dcm"
    film.parent.mkdir()
    film.write_bytes(real_file("RG1_UNCR.dcm").read_bytes())
    config = tmp_path / "site.toml"
    config.write_text(
        f'[segmentation]\ndevice = "cpu"\n[classifier]\ndevice = "cpu"\nbundle = "{bundle}"\n'
    )
    out = tmp_path / "out"
    result = RUNNER.invoke(
        app, ["process", str(film.parent), "--out", str(out), "--config", str(config)]
    )
    assert result.exit_code == 0, result.output
    (document,) = [json.loads(p.read_text()) for p in out.rglob("result.json")]
    (image,) = document["images"]
    findings = image["findings"]
    ours = np.array([findings["probabilities"][label] for label in FINDING_LABELS])

    header = read_header(film)
    assert isinstance(header, InstanceHeader)
    pixels = decode(header)[0].pixels  # the same image: the film as the pipeline decodes it
    theirs, rescaled = _xrv_probabilities(name, weights, pixels)
    assert theirs.min() > 0.02 and theirs.max() < 0.98  # not saturated: a real comparison
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    # Each call is torchxrayvision's own: op_norm(p) >= 0.5 <=> p >= the published threshold.
    for label, scaled in zip(FINDING_LABELS, rescaled, strict=True):
        assert findings["calls"][label] == ("positive" if scaled >= 0.5 else "negative")


def test_a_missing_checkpoint_names_the_file_expected_and_downloads_nothing(
    tmp_path: Path,
) -> None:
    result = RUNNER.invoke(
        app,
        [
            "bundle",
            "import-torchxrayvision",
            "densenet121-res224-all",
            "--weights-dir",
            str(tmp_path),
            "--out",
            str(tmp_path / "b"),
        ],
    )
    assert result.exit_code == 2
    expected = "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15"
    assert expected in result.output and "downloads nothing" in result.output
    assert list(tmp_path.iterdir()) == []  # no partial download, no bundle
    result = RUNNER.invoke(
        app,
        [
            "bundle",
            "import-torchxrayvision",
            "densenet121-res999",
            "--weights-dir",
            ".",
            "--out",
            str(tmp_path / "b"),
        ],
    )
    assert result.exit_code == 2 and "densenet121-res224-nih" in result.output


def test_a_torchvision_state_dict_is_imported_with_the_given_preprocessing(
    tmp_path: Path,
) -> None:
    from cxrbatch.models.bundle import build_network

    state = tmp_path / "net.pt"
    torch.save({"state_dict": build_network("densenet121", 2).state_dict()}, state)
    args = ["bundle", "import-torchvision", "--architecture", "densenet121"]
    args += ["--state-dict", str(state), "--labels", "Mass,Nodule", "--name", "site-net"]
    args += ["--threshold", "Mass=0.3", "--input-size", "128", "--out", str(tmp_path / "b")]
    result = RUNNER.invoke(app, args)
    assert result.exit_code == 0, result.output
    loaded = load_bundle(tmp_path / "b", "cpu")
    assert loaded.spec.labels == ("Mass", "Nodule") and loaded.spec.thresholds == {"Mass": 0.3}
    assert loaded.spec.input_size == 128 and loaded.model.name == "site-net"
    # A state dict of another shape is named, not a traceback.
    args[args.index("Mass,Nodule")] = "Mass,Nodule,Edema"
    result = RUNNER.invoke(app, args)
    assert result.exit_code == 2 and "not a densenet121 with 3 outputs" in result.output
