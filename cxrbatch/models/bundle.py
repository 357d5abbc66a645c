"""Classifier bundles in the MONAI bundle layout, and running them.

A bundle is a directory::

    configs/metadata.json   MONAI bundle metadata plus a "cxrbatch" section (below)
    models/model.pt         the torchvision network's state_dict

The "cxrbatch" section names the architecture (resnet50 | densenet121), the labels, the
input size and normalisation, the mask mode the model was trained with, the per-label
operating thresholds, optional screening threshold on the No Finding score, and the
training data with a flag saying whether it was synthetic.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
import torchvision
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cxrbatch.domain import FINDING_LABELS, Findings, ModelRef, Triage
from cxrbatch.errors import ModelError
from cxrbatch.files import atomic_write, sha256_file
from cxrbatch.models.batching import Forward, batched
from cxrbatch.models.device import resolve_device
from cxrbatch.models.graphs import cpu_inference_graph, image_shape
from cxrbatch.models.masks import MaskMode
from cxrbatch.models.preflight import bundle_files

log = logging.getLogger(__name__)

LABELS: tuple[str, ...] = FINDING_LABELS
NO_FINDING = "No Finding"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TrainingData(BaseModel):
    model_config = ConfigDict(extra="allow")
    description: str
    synthetic: bool


class Screening(BaseModel):
    model_config = ConfigDict(extra="allow")
    no_finding_threshold: float = Field(ge=0.0, le=1.0)
    target_sensitivity: float | None = None


class BundleSpec(BaseModel):
    """The "cxrbatch" section of configs/metadata.json."""

    model_config = ConfigDict(extra="allow", frozen=True)
    architecture: Literal["resnet50", "densenet121"]
    labels: tuple[str, ...] = LABELS
    input_size: int = Field(512, ge=32, le=2048)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    mask_mode: MaskMode
    thresholds: dict[str, float] = {}
    screening: Screening | None = None
    training_data: TrainingData

    @model_validator(mode="after")
    def _thresholds_for_labels(self) -> BundleSpec:
        unknown = set(self.thresholds) - set(self.labels)
        if unknown:
            raise ValueError(f"thresholds name labels not in the bundle: {sorted(unknown)}")
        return self


# The torchvision ImageNet weights the paper's networks start from.
IMAGENET_WEIGHTS: dict[str, torchvision.models.WeightsEnum] = {
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
    "densenet121": torchvision.models.DenseNet121_Weights.IMAGENET1K_V1,
}


def build_network(architecture: str, num_labels: int, pretrained: bool = False) -> torch.nn.Module:
    """The torchvision network with a `num_labels`-way head (logits)."""
    weights = IMAGENET_WEIGHTS.get(architecture) if pretrained else None
    if architecture == "resnet50":
        net = torchvision.models.resnet50(weights=weights)
        net.fc = torch.nn.Linear(net.fc.in_features, num_labels)
        return cast(torch.nn.Module, net)
    if architecture == "densenet121":
        net = torchvision.models.densenet121(weights=weights)
        net.classifier = torch.nn.Linear(net.classifier.in_features, num_labels)
        return cast(torch.nn.Module, net)
    raise ModelError(f"Expected architecture 'resnet50' or 'densenet121', found {architecture!r}.")


def save_bundle(
    directory: Path,
    network: torch.nn.Module,
    name: str,
    version: str,
    spec: BundleSpec,
    description: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a bundle directory; returns the model file's path."""
    try:
        import monai

        monai_version: str | None = monai.__version__
    except ImportError:  # recorded as unknown; MONAI is only needed for training
        monai_version = None
    model_path = directory / "models" / "model.pt"
    atomic_write(model_path, lambda h: torch.save(network.state_dict(), h))
    metadata: dict[str, Any] = {
        "name": name,
        "version": version,
        "changelog": {version: "exported by cxrbatch"},
        "monai_version": monai_version,
        "pytorch_version": torch.__version__,
        "numpy_version": np.__version__,
        "task": "Multi-label chest radiograph classification (lung-masked input)",
        "description": description,
        "intended_use": "Research and triage support only. Not for diagnostic use.",
        "data_type": "dicom or png, 8-bit display form",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "num_channels": 3,
                    "spatial_shape": [spec.input_size, spec.input_size],
                    "dtype": "float32",
                    "is_patch_data": False,
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classification",
                    "num_channels": len(spec.labels),
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_onehot": False,
                    "channel_def": {str(i): label for i, label in enumerate(spec.labels)},
                }
            },
        },
        "model_sha256": sha256_file(model_path),
        "cxrbatch": spec.model_dump(mode="json"),
    }
    if extra:
        metadata.update(extra)
    text = json.dumps(metadata, indent=2).encode()
    atomic_write(directory / "configs" / "metadata.json", lambda h: h.write(text))
    return model_path


@dataclass(frozen=True, eq=False)
class ClassifierBundle:
    path: Path
    spec: BundleSpec
    model: ModelRef
    network: torch.nn.Module
    device: torch.device
    bf16: bool = False
    # What forward() runs: `network`, or on the CPU its frozen inference graph.
    graph: torch.nn.Module | None = None
    # What predict() calls on a device batch: forward(), or a Batcher around it that
    # joins the passes of concurrent studies (with_batching).
    run: Forward | None = None

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits for a batch on the device (autocast is per thread: it is set here)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return cast(torch.Tensor, (self.graph or self.network)(batch))

    def with_batching(self, max_batch: int, max_wait_s: float = 0.005) -> ClassifierBundle:
        """This bundle with concurrent predict() calls sharing batches of up to max_batch."""
        return replace(self, run=batched(self.forward, max_batch, max_wait_s))

    @torch.inference_mode()
    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """Sigmoid probabilities (N, labels) for network inputs (N, 3, S, S)."""
        batch = torch.from_numpy(np.ascontiguousarray(inputs))
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
            batch = batch.contiguous(memory_format=torch.channels_last)
        logits = (self.run or self.forward)(batch)
        return torch.sigmoid(logits.float()).cpu().numpy()

    def findings(self, probabilities: np.ndarray) -> Findings:
        probs = {label: float(p) for label, p in zip(self.spec.labels, probabilities, strict=True)}
        no_finding = 1.0 - max(probs.values())
        triage = threshold = None
        if self.spec.screening is not None:
            threshold = self.spec.screening.no_finding_threshold
            triage = Triage.LIKELY_NORMAL if no_finding >= threshold else Triage.ABNORMAL
        return Findings(self.model, probs, no_finding, triage, threshold)


def load_bundle(
    path: str | Path,
    device: str = "auto",
    precision: str = "fp32",
    optimize_cpu: bool = False,
    graph_cache: Path | None = None,
) -> ClassifierBundle:
    """Load and verify a bundle. precision: fp32, bf16, or auto (bf16 on CUDA only);
    optimize_cpu: on the CPU, predict with a frozen inference graph of the network, kept
    in `graph_cache` between processes when given (cxrbatch/models/graphs.py)."""
    root = Path(path)
    meta_path, model_path, metadata = bundle_files(root)
    try:
        spec = BundleSpec.model_validate(metadata["cxrbatch"])
    except ValidationError as exc:
        raise ModelError(f"Invalid bundle metadata in {meta_path}: {exc}") from exc
    digest = sha256_file(model_path)
    recorded = metadata.get("model_sha256")
    if recorded and recorded != digest:
        raise ModelError(
            f"Expected model.pt with SHA-256 {recorded} (from metadata.json), found {digest}."
        )
    network = build_network(spec.architecture, len(spec.labels))
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
        network.load_state_dict(state, strict=True)
    except Exception as exc:
        raise ModelError(f"{model_path} does not match a {spec.architecture}: {exc}") from exc
    torch_device = resolve_device(device)
    network = network.to(torch_device).eval()
    if torch_device.type == "cuda":
        network = network.to(memory_format=torch.channels_last)
    bf16 = precision == "bf16" or (precision == "auto" and torch_device.type == "cuda")
    model = ModelRef(
        name=str(metadata.get("name", root.name)),
        version=str(metadata.get("version", "0")),
        sha256=digest,
        synthetic_training_data=spec.training_data.synthetic,
        mask_mode=spec.mask_mode,
    )
    if spec.training_data.synthetic:
        log.warning(
            "classifier bundle %s was trained on SYNTHETIC data: outputs are not "
            "clinically meaningful",
            model.name,
        )
    graph = None
    if optimize_cpu and torch_device.type == "cpu":
        graph = cpu_inference_graph(
            network,
            image_shape(spec.input_size),
            f"classifier {model.name}",
            graph_cache,
            digest,
            fuse=True,
        )
    return ClassifierBundle(root, spec, model, network, torch_device, bf16, graph)
