"""Bundles in MONAI's bundle format: every key MONAI's bundle specification makes
mandatory, a `network_def` that MONAI's ConfigParser instantiates, an inference.json that
MONAI's own runner runs on a real film, docs/README.md and LICENSE, and the bundles
cxrbatch wrote before still read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrbatch.dicom.decode import decode
from cxrbatch.dicom.discover import read_header
from cxrbatch.domain import InstanceHeader
from cxrbatch.models.bundle import load_bundle
from cxrbatch.models.preprocess import ClassifierInputs
from tests.conftest import make_tiny_bundle, real_file

# docs/source/mb_specification.rst: the mandatory keys of metadata.json, and of each
# tensor format specifier in network_data_format.
MANDATORY = (
    "version",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "optional_packages_version",
    "task",
    "description",
    "authors",
    "copyright",
    "network_data_format",
)
TENSOR_KEYS = (
    "type",
    "format",
    "modality",
    "num_channels",
    "spatial_shape",
    "dtype",
    "value_range",
    "is_patch_data",
    "channel_def",
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("monai") / "b", "original", screening=0.5)


def test_the_metadata_has_every_key_the_monai_specification_requires(bundle: Path) -> None:
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    missing = [key for key in MANDATORY if key not in metadata]
    assert not missing
    assert metadata["schema"].endswith(".json") and metadata["changelog"][metadata["version"]]
    assert isinstance(metadata["optional_packages_version"], dict)
    for kind in ("inputs", "outputs"):
        for name, tensor in metadata["network_data_format"][kind].items():
            assert not [k for k in TENSOR_KEYS if k not in tensor], (kind, name)
    outputs = metadata["network_data_format"]["outputs"]["pred"]
    assert outputs["channel_def"] == {"0": "Mass", "1": "Nodule", "2": "Pneumonia"} | {
        "3": "Edema",
        "4": "Fibrosis",
    }
    readme = (bundle / "docs" / "README.md").read_text()
    assert "NOT FOR DIAGNOSTIC USE" in readme and "SYNTHETIC" in readme
    assert (bundle / "LICENSE").read_text().strip()


def test_monai_verify_metadata_where_the_schema_file_is_at_hand(bundle: Path) -> None:
    schema = os.environ.get("CXRBATCH_MONAI_SCHEMA")
    if not schema:
        pytest.skip(
            "MONAI's metadata schema cannot be downloaded here: set CXRBATCH_MONAI_SCHEMA "
            "to a local copy of meta_schema_20240725.json to run verify_metadata"
        )
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=schema)


def test_monai_config_parser_builds_the_network(bundle: Path) -> None:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    network = parser.get_parsed_content("network_def")
    assert isinstance(network, torch.nn.Module)
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    network.load_state_dict(state, strict=True)  # the bundle's weights fit what MONAI built


def test_monai_bundle_run_classifies_a_real_film_as_the_pipeline_does(
    tmp_path: Path, bundle: Path
) -> None:
    film = real_file("RG1_UNCR.dcm")
    output = tmp_path / "prediction.json"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file"]
    command += [str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle)]
    command += ["--image", str(film), "--output", str(output)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    predicted = json.loads(output.read_text())
    loaded = load_bundle(bundle, "cpu")
    header = read_header(film)
    assert isinstance(header, InstanceHeader)
    spec = loaded.spec
    tensor = ClassifierInputs(decode(header)[0].pixels, None).tensor(
        spec.mask_mode, spec.input_size, spec.mean, spec.std, spec.crop, spec.resize
    )
    expected = loaded.predict(tensor[None])[0]
    got = np.array([predicted["probabilities"][label] for label in spec.labels])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert predicted["calls"]["Mass"] == bool(expected[0] >= 0.5)
    assert predicted["synthetic_training_data"] is True


def test_a_bundle_written_before_the_monai_fields_still_loads(tmp_path: Path, bundle: Path) -> None:
    """The layout of bundles before this version: metadata.json and model.pt only, without
    the MONAI keys, inference.json, docs or LICENSE, and without channels/crop/resize."""
    old = tmp_path / "old"
    (old / "configs").mkdir(parents=True)
    (old / "models").mkdir()
    (old / "models" / "model.pt").write_bytes((bundle / "models" / "model.pt").read_bytes())
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    for key in ("schema", "optional_packages_version", "authors", "copyright", "references"):
        metadata.pop(key)
    for key in ("in_channels", "crop", "resize"):
        metadata["cxrbatch"].pop(key)
    (old / "configs" / "metadata.json").write_text(json.dumps(metadata))
    then, now = load_bundle(old, "cpu"), load_bundle(bundle, "cpu")
    assert then.spec == now.spec and then.model.sha256 == now.model.sha256
    batch = np.random.default_rng(0).normal(size=(1, 3, 64, 64)).astype(np.float32)
    np.testing.assert_array_equal(then.predict(batch), now.predict(batch))
