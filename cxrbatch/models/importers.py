"""Classifier bundles from trained networks published elsewhere.

`import_torchxrayvision` turns a TorchXRayVision release checkpoint that the user has
downloaded into a cxrbatch bundle for the study's five labels. The checkpoint is read by
torchxrayvision itself (`xrv.models.get_model(name, cache_dir=...)`: its own loading of its
own release files, some of which are pickled whole modules, which this module never
unpickles itself). What the bundle keeps is a plain state dict of the same network in
torchvision's form (one input channel), with the head cut down to the five labels' rows:
sigmoid of those logits is exactly the probability torchxrayvision computes before its
operating-point rescaling (`op_norm`), and the published operating thresholds become the
bundle's per-label thresholds, so a call "positive" is what `op_norm(p) >= 0.5` says.

The bundle declares the model's own preprocessing: one channel scaled to [-1024, 1024]
(`xrv.utils.normalize`), a centre crop to a square (`XRayCenterCrop`) and scikit-image's
anti-aliased resize to the model's resolution (`XRayResizer`), on the unmasked image.

`import_torchvision` wraps any torchvision ResNet50/DenseNet121 state dict with labels and
preprocessing given by the caller.

Nothing here downloads: a missing file is an error that names the file expected.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from cxrbatch.domain import FINDING_LABELS
from cxrbatch.errors import ModelError
from cxrbatch.files import sha256_file
from cxrbatch.models.bundle import BundleSpec, TrainingData, build_network, save_bundle
from cxrbatch.models.masks import MaskMode

# xrv.utils.normalize maps [0, 255] to [-1024, 1024]; on the [0, 1] scale of the pipeline
# that is (x - 0.5) / (0.5 / 1024).
XRV_MEAN = (0.5,)
XRV_STD = (0.5 / 1024.0,)
SUPPORTED_XRV = ("densenet121-res224-", "resnet50-res512-")


def _torchxrayvision() -> Any:
    try:
        import torchxrayvision
    except ImportError as exc:  # an optional dependency: only importing needs it
        raise ModelError(
            "Importing a TorchXRayVision model needs the torchxrayvision package: "
            "pip install 'cxrbatch[training]' (or torchxrayvision)."
        ) from exc
    return torchxrayvision


def xrv_weights_file(name: str, weights_dir: Path) -> tuple[Path, str]:
    """The file torchxrayvision reads for `name` in `weights_dir`, and its release URL."""
    xrv = _torchxrayvision()
    names = sorted(k for k in xrv.models.model_urls if k.startswith(SUPPORTED_XRV))
    if name not in names:
        raise ModelError(f"Expected a TorchXRayVision weights name in {names}, found {name!r}.")
    url = str(xrv.models.model_urls[name]["weights_url"])
    return weights_dir / os.path.basename(url), url


def _head_rows(
    state: dict[str, torch.Tensor], head: str, indices: list[int]
) -> dict[str, torch.Tensor]:
    out = {k: v.detach().clone() for k, v in state.items() if k != "op_threshs"}
    for part in ("weight", "bias"):
        out[f"{head}.{part}"] = state[f"{head}.{part}"][indices].detach().clone()
    return out


def import_torchxrayvision(
    name: str,
    weights_dir: Path,
    out: Path,
    version: str = "1",
    labels: Sequence[str] = FINDING_LABELS,
) -> Path:
    """Write a bundle at `out` from the TorchXRayVision checkpoint `name` in `weights_dir`;
    returns the bundle directory."""
    xrv = _torchxrayvision()
    expected, url = xrv_weights_file(name, weights_dir)
    if not expected.is_file():
        raise ModelError(
            f"Expected the {name} weights at {expected}: download {url} to that path "
            "(cxrbatch downloads nothing at run time)."
        )
    entry: Mapping[str, Any] = xrv.models.model_urls[name]
    try:
        model = xrv.models.get_model(name, cache_dir=str(weights_dir))
    except Exception as exc:
        raise ModelError(f"torchxrayvision could not load {expected}: {exc}") from exc
    targets = list(model.targets)
    missing = [label for label in labels if label not in targets]
    if missing:
        raise ModelError(f"{name} does not predict {', '.join(missing)} (it predicts {targets}).")
    indices = [targets.index(label) for label in labels]
    if name.startswith("densenet121"):
        architecture: Literal["resnet50", "densenet121"] = "densenet121"
        state = _head_rows(model.state_dict(), "classifier", indices)
    else:
        architecture = "resnet50"
        state = _head_rows(model.model.state_dict(), "fc", indices)
    network = build_network(architecture, len(labels), in_channels=1)
    network.load_state_dict(state, strict=True)
    published = [float(entry["op_threshs"][i]) for i in indices] if "op_threshs" in entry else []
    thresholds = {
        label: t for label, t in zip(labels, published, strict=False) if not math.isnan(t)
    }
    description = str(entry.get("description") or f"TorchXRayVision {name}")
    spec = BundleSpec(
        architecture=architecture,
        labels=tuple(labels),
        input_size=int(entry.get("input_resolution", 224)),
        in_channels=1,
        mean=XRV_MEAN,
        std=XRV_STD,
        crop="center",
        resize="skimage",
        mask_mode="original",
        thresholds=thresholds,
        training_data=TrainingData(
            description=f"{description} (public data sets; see the TorchXRayVision paper)",
            synthetic=False,
        ),
    )
    source = {
        "kind": "torchxrayvision",
        "weights": name,
        "url": url,
        "file": expected.name,
        "file_sha256": sha256_file(expected),
        "torchxrayvision_version": str(xrv.__version__),
        "imported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "thresholds": "op_threshs published with the weights (torchxrayvision model_urls)",
    }
    save_bundle(
        out,
        network,
        name=f"torchxrayvision-{name}",
        version=version,
        spec=spec,
        description=f"TorchXRayVision {name} ({architecture}), imported: {description}",
        authors="Joseph Paul Cohen et al. (TorchXRayVision); imported by cxrbatch",
        license_text=XRV_LICENSE,
        references=[
            "Cohen JP et al. TorchXRayVision: A library of chest X-ray datasets and models. "
            "MIDL 2022. https://github.com/mlmed/torchxrayvision"
        ],
        extra={"source": source},
    )
    return out


XRV_LICENSE = (
    "The network weights were published by the TorchXRayVision project "
    "(https://github.com/mlmed/torchxrayvision, Apache License 2.0); the data sets they "
    "were trained on carry their own terms of use. This bundle repackages them unchanged "
    "apart from keeping only the rows of the output layer for the labels listed in "
    "configs/metadata.json.\n"
)


def _plain_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"Expected a state dict file at {path}.")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{path} is not a plain state dict (weights_only load): {exc}") from exc
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise ModelError(f"{path} holds no state dict of tensors.")
    return {str(k).removeprefix("module."): v for k, v in loaded.items()}


def import_torchvision(
    architecture: Literal["resnet50", "densenet121"],
    state_dict: Path,
    labels: Sequence[str],
    out: Path,
    *,
    name: str,
    version: str = "1",
    input_size: int = 224,
    in_channels: Literal[1, 3] = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    mask_mode: MaskMode = "original",
    thresholds: Mapping[str, float] | None = None,
    description: str = "",
    synthetic: bool = False,
) -> Path:
    """Write a bundle at `out` for a torchvision network's state dict."""
    spec = BundleSpec(
        architecture=architecture,
        labels=tuple(labels),
        input_size=input_size,
        in_channels=in_channels,
        mean=tuple(mean) if mean else BundleSpec.model_fields["mean"].default[:in_channels],
        std=tuple(std) if std else BundleSpec.model_fields["std"].default[:in_channels],
        mask_mode=mask_mode,
        thresholds=dict(thresholds or {}),
        training_data=TrainingData(
            description=description or "given by the importer", synthetic=synthetic
        ),
    )
    network = build_network(architecture, len(labels), in_channels=in_channels)
    try:
        network.load_state_dict(_plain_state_dict(state_dict), strict=True)
    except RuntimeError as exc:
        raise ModelError(
            f"{state_dict} is not a {architecture} with {len(labels)} outputs and "
            f"{in_channels} input channel(s): {str(exc).splitlines()[0]}"
        ) from exc
    save_bundle(
        out,
        network,
        name=name,
        version=version,
        spec=spec,
        description=description or f"{architecture} imported from {state_dict.name}",
        extra={
            "source": {
                "kind": "torchvision state dict",
                "file": state_dict.name,
                "file_sha256": sha256_file(state_dict),
            }
        },
    )
    return out
