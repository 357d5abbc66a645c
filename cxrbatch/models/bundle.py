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

import functools
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
from cxrbatch.models.engines import (
    PROBABILITY_TOLERANCE,
    Engine,
    cached_reference,
    compile_network,
    largest_difference,
    resolve,
)
from cxrbatch.models.graphs import cpu_inference_graph, image_shape, source_sha256
from cxrbatch.models.masks import MaskMode
from cxrbatch.models.preflight import bundle_files
from cxrbatch.models.preprocess import Crop, Resize

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
    # Input channels of the network's first convolution (the image is repeated to them),
    # with one mean and std per channel on the [0, 1] scale.
    in_channels: Literal[1, 3] = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop: Crop = "none"
    resize: Resize = "area"
    mask_mode: MaskMode
    thresholds: dict[str, float] = {}
    screening: Screening | None = None
    training_data: TrainingData

    @model_validator(mode="after")
    def _thresholds_for_labels(self) -> BundleSpec:
        unknown = set(self.thresholds) - set(self.labels)
        if unknown:
            raise ValueError(f"thresholds name labels not in the bundle: {sorted(unknown)}")
        if not len(self.mean) == len(self.std) == self.in_channels:
            raise ValueError(
                f"mean and std need {self.in_channels} value(s) each (in_channels), "
                f"found {len(self.mean)} and {len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self


# The torchvision ImageNet weights the paper's networks start from.
IMAGENET_WEIGHTS: dict[str, torchvision.models.WeightsEnum] = {
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
    "densenet121": torchvision.models.DenseNet121_Weights.IMAGENET1K_V1,
}


def build_network(
    architecture: str, num_labels: int, pretrained: bool = False, in_channels: int = 3
) -> torch.nn.Module:
    """The torchvision network with a `num_labels`-way head (logits); with one input
    channel, its first convolution takes one (as TorchXRayVision's networks do)."""
    weights = IMAGENET_WEIGHTS.get(architecture) if pretrained else None
    first = {"kernel_size": 7, "stride": 2, "padding": 3, "bias": False}
    if architecture == "resnet50":
        net = torchvision.models.resnet50(weights=weights)
        net.fc = torch.nn.Linear(net.fc.in_features, num_labels)
        if in_channels != 3:
            net.conv1 = torch.nn.Conv2d(in_channels, 64, **first)  # type: ignore[arg-type]
        return cast(torch.nn.Module, net)
    if architecture == "densenet121":
        net = torchvision.models.densenet121(weights=weights)
        net.classifier = torch.nn.Linear(net.classifier.in_features, num_labels)
        if in_channels != 3:
            conv = torch.nn.Conv2d(in_channels, 64, **first)  # type: ignore[arg-type]
            net.features.conv0 = conv
        return cast(torch.nn.Module, net)
    raise ModelError(f"Expected architecture 'resnet50' or 'densenet121', found {architecture!r}.")


class Trunk(torch.nn.Module):
    """A classifier up to its last convolutional block's output (ResNet-50 `layer4`,
    DenseNet-121 `features` after its ReLU), as torchvision's forward() computes it: what
    the CPU graph or another engine runs. The head (`head`: global average pooling, then
    the linear layer) runs after it in torch, and the finding maps are made from the
    same activations (heatmaps.py), so a study's maps cost no second pass."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        if not isinstance(network, torchvision.models.ResNet | torchvision.models.DenseNet):
            raise ValueError(f"no trunk known for {type(network).__name__}")
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.network
        if isinstance(net, torchvision.models.ResNet):
            x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            return cast(torch.Tensor, net.layer4(net.layer3(net.layer2(net.layer1(x)))))
        return torch.relu(net.features(x))


def linear_head(network: torch.nn.Module) -> torch.nn.Linear:
    """The linear layer that makes the logits from the pooled activations."""
    layer = network.fc if isinstance(network, torchvision.models.ResNet) else network.classifier
    return cast(torch.nn.Linear, layer)


def head(network: torch.nn.Module, activations: torch.Tensor) -> torch.Tensor:
    """Logits from the trunk's activations, as torchvision's forward() ends."""
    pooled = torch.nn.functional.adaptive_avg_pool2d(activations, (1, 1))
    return cast(torch.Tensor, linear_head(network)(torch.flatten(pooled, 1)))


# The metadata schema of MONAI's bundle specification (the one the MONAI model zoo uses).
MONAI_SCHEMA = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
    "meta_schema_20240725.json"
)
CXRBATCH_LICENSE = (
    "Weights produced with cxrbatch (Apache License 2.0). Training data terms: see "
    "configs/metadata.json (training_data, data_source). Not for diagnostic use.\n"
)


def save_bundle(
    directory: Path,
    network: torch.nn.Module,
    name: str,
    version: str,
    spec: BundleSpec,
    description: str,
    extra: dict[str, Any] | None = None,
    *,
    changelog: dict[str, str] | None = None,
    authors: str = "cxrbatch",
    license_text: str = CXRBATCH_LICENSE,
    references: list[str] | None = None,
) -> Path:
    """Write a bundle directory in MONAI's bundle layout; returns the model file's path.

    configs/metadata.json carries every key MONAI's bundle specification makes mandatory,
    configs/inference.json lets MONAI's own runner classify an image with it
    (cxrbatch/models/monai_run.py), and docs/README.md and LICENSE say what it is.
    """
    try:
        import monai

        monai_version: str = monai.__version__
    except ImportError:  # recorded as unknown; MONAI is only needed for training
        monai_version = "unknown"
    model_path = directory / "models" / "model.pt"
    atomic_write(model_path, lambda h: torch.save(network.state_dict(), h))
    synthetic = spec.training_data.synthetic
    metadata: dict[str, Any] = {
        "schema": MONAI_SCHEMA,
        "name": name,
        "version": version,
        "changelog": changelog or {version: "exported by cxrbatch"},
        "monai_version": monai_version,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "optional_packages_version": {
            "torchvision": torchvision.__version__.split("+")[0],
            "pydicom": _version("pydicom"),
            "highdicom": _version("highdicom"),
        },
        "required_packages_version": {"cxrbatch": _version("cxrbatch")},
        "task": "Multi-label chest radiograph classification (lung-masked input)",
        "description": description,
        "authors": authors,
        "copyright": f"Copyright (c) {authors}",
        "data_source": spec.training_data.description,
        "data_type": "dicom or png, 8-bit display form",
        "image_classes": (
            f"{spec.in_channels} channel(s), {spec.input_size} x {spec.input_size}, "
            f"mask mode {spec.mask_mode}, normalised with mean {list(spec.mean)} and std "
            f"{list(spec.std)} on the [0, 1] scale"
        ),
        "label_classes": ", ".join(spec.labels),
        "pred_classes": f"{len(spec.labels)} independent sigmoid probabilities",
        "intended_use": "Research and triage support only. Not for diagnostic use."
        + (" TRAINED ON SYNTHETIC DATA: not clinically meaningful." if synthetic else ""),
        "references": references or ["Masked chest X-ray classification study: arXiv 2512.23089"],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "CR/DX",
                    "num_channels": spec.in_channels,
                    "spatial_shape": [spec.input_size, spec.input_size],
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": False,
                    "channel_def": {str(i): "radiograph" for i in range(spec.in_channels)},
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classes",
                    "modality": "n/a",
                    "num_channels": len(spec.labels),
                    "spatial_shape": [len(spec.labels)],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
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
    write_bundle_files(directory, metadata, license_text)
    return model_path


def write_bundle_files(
    directory: Path, metadata: dict[str, Any], license_text: str | None = None
) -> None:
    """configs/metadata.json, configs/inference.json and docs/README.md from `metadata`
    (its "cxrbatch" section is the spec), and LICENSE when given."""
    spec = BundleSpec.model_validate(metadata["cxrbatch"])
    _write_text(directory / "configs" / "metadata.json", json.dumps(metadata, indent=2))
    inference = inference_config(spec)
    _write_text(directory / "configs" / "inference.json", json.dumps(inference, indent=2))
    _write_text(directory / "docs" / "README.md", _readme(metadata, spec))
    if license_text is not None:
        _write_text(directory / "LICENSE", license_text)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _write_text(path: Path, text: str) -> None:
    data = text.encode()
    atomic_write(path, lambda h: h.write(data))


def inference_config(spec: BundleSpec) -> dict[str, Any]:
    """configs/inference.json: MONAI's ConfigParser builds `network_def` (the torchvision
    network), loads models/model.pt into it, and `run` classifies `image` (a DICOM file or
    a PNG) with the bundle's own preprocessing, writing the probabilities to `output`::

        python -m monai.bundle run --config_file BUNDLE/configs/inference.json \\
            --bundle_root BUNDLE --image IMAGE.dcm --output OUT.json
    """
    return {
        "imports": ["$import torch", "$import cxrbatch.models.monai_run as monai_run"],
        "bundle_root": ".",
        "image": "",
        "output": "$@bundle_root + '/eval/prediction.json'",
        "device": "$torch.device('cpu')",
        "network_def": {
            "_target_": "cxrbatch.models.bundle.build_network",
            "architecture": spec.architecture,
            "num_labels": len(spec.labels),
            "in_channels": spec.in_channels,
        },
        "checkpoint": (
            "$torch.load(@bundle_root + '/models/model.pt', map_location='cpu', weights_only=True)"
        ),
        "network": "$monai_run.with_weights(@network_def, @checkpoint, @device)",
        "run": ["$monai_run.classify(@network, @bundle_root, @image, @output)"],
    }


def _readme(metadata: dict[str, Any], spec: BundleSpec) -> str:
    thresholds = ", ".join(f"{k} {v:.4g}" for k, v in spec.thresholds.items()) or "none"
    screening = (
        f"No Finding >= {spec.screening.no_finding_threshold:.4g} is likely-normal"
        if spec.screening
        else "none (not a screening bundle)"
    )
    synthetic = (
        "\n**TRAINED ON SYNTHETIC DATA: its outputs are not clinically meaningful.**\n"
        if spec.training_data.synthetic
        else ""
    )
    return f"""# {metadata["name"]} {metadata["version"]}
{synthetic}
{metadata["description"]}

NOT FOR DIAGNOSTIC USE. {metadata["intended_use"]}

- Network: torchvision {spec.architecture}, {spec.in_channels} input channel(s),
  {spec.input_size} x {spec.input_size}, crop {spec.crop}, resize {spec.resize}
- Mask mode: {spec.mask_mode}
- Labels: {", ".join(spec.labels)} (sigmoid probabilities; No Finding = 1 - max)
- Per-label thresholds: {thresholds}
- Screening: {screening}
- Training data: {spec.training_data.description}
- Weights SHA-256: {metadata["model_sha256"]}

## Use

In cxrbatch: set `classifier.bundle` (or `classifier.screening_bundle`) to this folder.

With MONAI's bundle runner:

    python -m monai.bundle run --config_file configs/inference.json \\
        --bundle_root . --image IMAGE.dcm --output prediction.json

## Changes

""" + "".join(f"- {v}: {c}\n" for v, c in metadata["changelog"].items())


@dataclass(frozen=True, eq=False)
class ClassifierBundle:
    path: Path
    spec: BundleSpec
    model: ModelRef
    network: torch.nn.Module
    device: torch.device
    bf16: bool = False
    # What trunk() runs: Trunk(network), or on the CPU its frozen inference graph or
    # another engine's model of it (engines.py).
    graph: Forward | None = None
    engine: str = "torch"
    # What evaluate() calls on a device batch: trunk(), or a Batcher around it that joins
    # the passes of concurrent studies (with_batching).
    run: Forward | None = None

    def trunk(self, batch: torch.Tensor) -> torch.Tensor:
        """The last convolutional block's activations for a batch on the device (autocast
        is per thread: it is set here)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return cast(torch.Tensor, (self.graph or self._eager_trunk)(batch))

    @functools.cached_property
    def _eager_trunk(self) -> Trunk:
        return Trunk(self.network)

    def with_batching(self, max_batch: int, max_wait_s: float = 0.005) -> ClassifierBundle:
        """This bundle with concurrent evaluate() calls sharing batches of up to max_batch."""
        return replace(self, run=batched(self.trunk, max_batch, max_wait_s))

    @torch.inference_mode()
    def evaluate(self, inputs: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """Sigmoid probabilities (N, labels) for network inputs (N, 3, S, S), and the
        trunk's activations they came from (N, C, h, w; on the device, in the pass's
        precision), which the finding maps use: copied to the host only where a map is
        made."""
        batch = torch.from_numpy(np.ascontiguousarray(inputs))
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
            batch = batch.contiguous(memory_format=torch.channels_last)
        activations = (self.run or self.trunk)(batch)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = head(self.network, activations)
        probabilities = torch.sigmoid(logits.float()).cpu().numpy()
        return probabilities, activations

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """Sigmoid probabilities (N, labels) for network inputs (N, 3, S, S)."""
        return self.evaluate(inputs)[0]

    def findings(self, probabilities: np.ndarray) -> Findings:
        probs = {label: float(p) for label, p in zip(self.spec.labels, probabilities, strict=True)}
        no_finding = 1.0 - max(probs.values())
        triage = threshold = None
        if self.spec.screening is not None:
            threshold = self.spec.screening.no_finding_threshold
            triage = Triage.LIKELY_NORMAL if no_finding >= threshold else Triage.ABNORMAL
        return Findings(
            self.model, probs, no_finding, triage, threshold, dict(self.spec.thresholds)
        )


def load_bundle(
    path: str | Path,
    device: str = "auto",
    precision: str = "fp32",
    optimize_cpu: bool = False,
    graph_cache: Path | None = None,
    engine: str = "torch",
) -> ClassifierBundle:
    """Load and verify a bundle. precision: fp32, bf16, or auto (bf16 on CUDA only);
    optimize_cpu: on the CPU, run the network's trunk (`Trunk`) as a frozen inference
    graph, kept in `graph_cache` between processes when given (cxrbatch/models/graphs.py),
    or on `engine` (engines.py) where it gives torch fp32's probabilities and activations
    on a probe."""
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
    # Built on the meta device and given the file's tensors: initialising about 200
    # convolutions' random weights only to replace them took 0.3 s a classifier.
    with torch.device("meta"):
        network = build_network(spec.architecture, len(spec.labels), in_channels=spec.in_channels)
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
        network.load_state_dict(state, strict=True, assign=True)
    except Exception as exc:
        raise ModelError(f"{model_path} does not match a {spec.architecture}: {exc}") from exc
    if any(t.is_meta for t in (*network.parameters(), *network.buffers())):
        raise ModelError(f"{model_path} does not hold every tensor of a {spec.architecture}")
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
    graph: Forward | None = None
    chosen = resolve(engine, "classifier", torch_device) if optimize_cpu else "torch"
    if chosen != "torch" and not bf16:
        graph = _on_engine(network, spec, chosen, f"classifier {model.name}", graph_cache, digest)
    if graph is not None:
        return ClassifierBundle(root, spec, model, network, torch_device, bf16, graph, chosen)
    if optimize_cpu and torch_device.type == "cpu":
        graph = cpu_inference_graph(
            Trunk(network),
            image_shape(spec.input_size, spec.in_channels),
            f"classifier {model.name}",
            graph_cache,
            digest,
            fuse=True,
        )
    return ClassifierBundle(root, spec, model, network, torch_device, bf16, graph)


# The trunk's activations make the finding maps (pictures, scaled to a peak of 1): a
# converted trunk may differ from torch's by this share of the largest activation.
ACTIVATION_TOLERANCE = 1e-4


def probe_batch(shape: tuple[int, ...]) -> torch.Tensor:
    """The load-time check's input for a converted classifier: one random image (a fixed
    seed) of the network's input shape, the batch the CPU runs at (processing.max_batch
    1); tests/test_engines.py checks the conversions at batch 2. Torch's answer on it is
    kept in the graph cache (engines.cached_reference), so a later process runs only the
    converted network, whose first call this also is."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(0))


def _on_engine(
    network: torch.nn.Module,
    spec: BundleSpec,
    engine: Engine,
    what: str,
    graph_cache: Path | None,
    digest: str,
) -> Forward | None:
    """The network's trunk converted for `engine`, or None where it could not be or where,
    on a fixed probe, the probabilities differ from torch fp32's by more than
    PROBABILITY_TOLERANCE or the activations (the finding maps' input) by more than
    ACTIVATION_TOLERANCE of the largest (refused in one line; the torch graph serves)."""
    shape = image_shape(spec.input_size, spec.in_channels)
    trunk = Trunk(network)
    converted = compile_network(
        trunk, (torch.zeros(shape),), engine, what, graph_cache, digest,
        dynamic={"input0": 0, "output": 0},
    )  # fmt: skip
    if converted is None:
        return None
    probe = probe_batch(shape)
    key = (trunk, (tuple(probe.shape), source_sha256(probe_batch)), digest)
    with torch.inference_mode():
        reference = cached_reference(graph_cache, key, lambda: trunk(probe), f"{what} probe")
        candidate = converted(probe)
        difference = largest_difference(
            torch.sigmoid(head(network, reference)), torch.sigmoid(head(network, candidate))
        )
        scale = float(reference.abs().max()) or 1.0
        activations = largest_difference(reference, candidate) / scale
    if difference > PROBABILITY_TOLERANCE or activations > ACTIVATION_TOLERANCE:
        log.warning(
            "%s: %s refused: on the probe its probabilities differ from torch fp32's by %.1e "
            "(allowed %.0e), its activations by %.1e of the largest (allowed %.0e); torch "
            "runs it",
            what,
            engine,
            difference,
            PROBABILITY_TOLERANCE,
            activations,
            ACTIVATION_TOLERANCE,
        )
        return None
    log.info(
        "%s on %s (probe: probabilities within %.1e of torch fp32, activations within %.1e)",
        what,
        engine,
        difference,
        activations,
    )
    return cast(Forward, converted)
