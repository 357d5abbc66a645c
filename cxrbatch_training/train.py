"""Classifier training with MONAI data handling, the paper's hyper-parameters by default.

Defaults (arXiv 2512.23089): ResNet50 or DenseNet121 with ImageNet weights, input
512 x 512, binary cross-entropy over the five findings, Adam with lr 1e-4, batch 4, up to
30 epochs. Added: early stopping on validation macro AUROC (`patience` epochs without
improvement), AMP (bf16 autocast) and channels_last on a GPU.

Inputs come from `cxrbatch.models.preprocess.classifier_input`, the function the daemon
runs, applied to the 8-bit image and the cached raw lung mask: the mask mode's erosion and
dilation, resizing and normalisation are the inference code itself.

A run folder holds `config.json` (the resolved config, seed, data files, library
versions), `best.pt` (the weights of the best validation epoch), while running `last.pt`
(model, optimiser, epoch, history: what resuming needs; removed at the end) and, when
finished, `summary.json`. Running again on the same folder resumes after the last
finished epoch, or returns at once when the run is complete; a folder holding a different
config is refused.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import monai
import numpy as np
import torch
import torchvision
from monai.data import CacheDataset, DataLoader, Dataset
from monai.transforms import Transform
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import Progress

import cxrbatch
from cxrbatch.dicom.export import write_json
from cxrbatch.files import atomic_write
from cxrbatch.models.bundle import IMAGENET_MEAN, IMAGENET_STD, IMAGENET_WEIGHTS, build_network
from cxrbatch.models.device import resolve_device
from cxrbatch.models.masks import MaskMode
from cxrbatch.models.preprocess import classifier_input
from cxrbatch_training.data import Record, load_gray, load_mask
from cxrbatch_training.maskgen import mask_path
from cxrbatch_training.metrics import macro_auroc

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """Hyper-parameters; the defaults are the paper's."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    architecture: Literal["resnet50", "densenet121"] = "resnet50"
    mask_mode: MaskMode = "original"
    input_size: Annotated[int, Field(ge=32, le=2048)] = 512
    batch_size: Annotated[int, Field(ge=1)] = 4
    learning_rate: Annotated[float, Field(gt=0)] = 1e-4
    max_epochs: Annotated[int, Field(ge=1)] = 30
    patience: Annotated[int, Field(ge=1)] = 5  # epochs without a better val macro AUROC
    seed: int = 0
    pretrained: bool = True  # ImageNet weights from the local torchvision cache
    amp: bool = True  # bf16 autocast, GPU only
    channels_last: bool = True  # GPU only
    num_workers: Annotated[int, Field(ge=0)] = 2
    cache_inputs: bool = False  # keep preprocessed inputs in memory (small data sets)
    # Recompute BatchNorm statistics with the epoch's final weights before validating. At
    # high learning rates the running averages lag the weights and distort the calibration
    # that the No Finding score (1 - max p) depends on. Off for the paper's lr 1e-4.
    recalibrate_batchnorm: bool = False
    device: str = "auto"


# The small CPU preset of the synthetic study and the demo bundle (not the paper's): 64 px
# inputs, batch 16, lr 1e-3 with BatchNorm recalibration, 5 epochs, random initialisation.
SMALL_CPU = TrainConfig(
    input_size=64,
    batch_size=16,
    learning_rate=1e-3,
    max_epochs=5,
    patience=5,
    pretrained=False,
    cache_inputs=True,
    recalibrate_batchnorm=True,
)


@dataclass(frozen=True)
class DataSpec:
    """Where a run's images and raw lung masks are."""

    images: dict[str, Path]  # Image Index -> file
    masks: Path | None  # cache folder of raw lung masks (cxrbatch_training.maskgen)
    synthetic: bool
    description: str


class PrepareInput(Transform):
    """{"image": path, "mask": path|None, "label": [...]} -> network input and target."""

    def __init__(self, mask_mode: MaskMode, size: int) -> None:
        self.mask_mode = mask_mode
        self.size = size

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        gray = load_gray(Path(item["image"]))
        lungs = load_mask(Path(item["mask"])) if self.mask_mode != "original" else None
        tensor = classifier_input(
            gray, lungs, self.mask_mode, self.size, IMAGENET_MEAN, IMAGENET_STD
        )
        return {"image": torch.from_numpy(tensor), "label": torch.tensor(item["label"])}


def dataset(
    records: list[Record], data: DataSpec, config: TrainConfig, cache: bool | None = None
) -> Dataset:
    items = []
    for r in records:
        mask = None
        if config.mask_mode != "original":
            if data.masks is None:
                raise ValueError(f"Mask mode {config.mask_mode} needs a lung mask folder.")
            mask = mask_path(data.masks, r.image_index)
            if not mask.is_file():
                raise FileNotFoundError(
                    f"No cached lung mask for {r.image_index} in {data.masks} "
                    "(run `cxrbatch training masks` first)"
                )
        items.append(
            {
                "image": str(data.images[r.image_index]),
                "mask": str(mask) if mask else None,
                "label": [float(v) for v in r.labels],
            }
        )
    transform = PrepareInput(config.mask_mode, config.input_size)
    if config.cache_inputs if cache is None else cache:
        return CacheDataset(items, transform, cache_rate=1.0, num_workers=None, progress=False)
    return Dataset(items, transform)


def imagenet_available(architecture: str) -> bool:
    """Whether torchvision's ImageNet weights for `architecture` are in the local cache."""
    from urllib.parse import urlparse

    name = Path(urlparse(IMAGENET_WEIGHTS[architecture].url).path).name
    return (Path(torch.hub.get_dir()) / "checkpoints" / name).is_file()


def versions() -> dict[str, str]:
    return {
        "cxrbatch": cxrbatch.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def make_loader(ds: Dataset, config: TrainConfig, shuffle: bool, epoch: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(config.seed * 1_000 + epoch)
    workers = 0 if isinstance(ds, CacheDataset) else config.num_workers
    return DataLoader(
        ds,
        batch_size=config.batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
    )


@torch.inference_mode()
def predict(
    network: torch.nn.Module, loader: DataLoader, device: torch.device, amp: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid probabilities and labels over a loader."""
    network.eval()
    probs, labels = [], []
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = network(images)
        probs.append(torch.sigmoid(logits.float()).cpu().numpy())
        labels.append(batch["label"].numpy())
    return np.concatenate(probs), np.concatenate(labels).astype(int)


@torch.no_grad()
def recalibrate_batchnorm(
    network: torch.nn.Module, ds: Dataset, config: TrainConfig, device: torch.device, amp: bool
) -> None:
    """Running BatchNorm statistics recomputed as plain averages over the training set."""
    norms = [m for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    network.train()
    for batch in make_loader(ds, config, shuffle=False):
        images = batch["image"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            network(images)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    best_epoch: int
    best_val_macro_auroc: float
    epochs_run: int
    training_seconds: float


def _config_document(config: TrainConfig, data: DataSpec, pretrained: bool) -> dict[str, Any]:
    return {
        "train": config.model_dump(mode="json"),
        "imagenet_weights_loaded": pretrained,
        "data": {
            "description": data.description,
            "synthetic": data.synthetic,
            "masks": str(data.masks) if data.masks else None,
        },
    }


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save through an atomic write: a kill never leaves half a checkpoint."""
    atomic_write(path, lambda handle: torch.save(state, handle))


def open_run_folder(
    run_dir: Path, document: dict[str, Any], extra: dict[str, Any]
) -> dict[str, Any] | None:
    """Start or reopen a run folder: write `config.json` (document + extra) or check that
    the one there records the same document; returns the summary of a finished run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.json"
    if config_path.is_file():
        recorded = json.loads(config_path.read_text())
        if {k: recorded.get(k) for k in document} != document:
            raise ValueError(f"{run_dir} holds a run of another config; use another folder.")
    else:
        write_json(config_path, {**document, **extra})
    summary = run_dir / "summary.json"
    return dict(json.loads(summary.read_text())) if summary.is_file() else None


def train(
    run_dir: Path,
    config: TrainConfig,
    data: DataSpec,
    train_records: list[Record],
    val_records: list[Record],
    progress: bool = True,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> RunResult:
    """Train (or resume, or return a finished run) in `run_dir`. `on_epoch`: told each
    epoch's history entry (epoch, train_loss, val_macro_auroc, seconds) as it ends, for a
    caller whose output is not a terminal (no progress bar there)."""
    device = resolve_device(config.device)
    pretrained = config.pretrained and imagenet_available(config.architecture)
    if config.pretrained and not pretrained:
        log.warning(
            "ImageNet weights for %s are not in the torchvision cache (%s): TRAINING FROM "
            "RANDOM INITIALISATION, unlike the paper",
            config.architecture,
            Path(torch.hub.get_dir()) / "checkpoints",
        )
    document = _config_document(config, data, pretrained)
    done = open_run_folder(run_dir, document, {"versions": versions(), "device": str(device)})
    if done is not None:
        return RunResult(
            run_dir,
            done["best_epoch"],
            done["best_val_macro_auroc"],
            done["epochs_run"],
            done["training_seconds"],
        )

    torch.manual_seed(config.seed)
    monai.utils.set_determinism(seed=config.seed)
    network = build_network(config.architecture, len(train_records[0].labels), pretrained)
    network = network.to(device)
    on_gpu = device.type == "cuda"
    if on_gpu and config.channels_last:
        network = network.to(memory_format=torch.channels_last)
    amp = on_gpu and config.amp
    optimizer = torch.optim.Adam(network.parameters(), lr=config.learning_rate)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    history: list[dict[str, float]] = []
    start_epoch, best, best_epoch, seconds = 0, -1.0, -1, 0.0
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if last_path.is_file():
        state = torch.load(last_path, map_location="cpu", weights_only=False)
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, best, best_epoch = state["history"], state["best"], state["best_epoch"]
        start_epoch, seconds = state["epoch"] + 1, state["seconds"]
        log.info("resuming %s after epoch %d", run_dir, state["epoch"])

    train_ds = dataset(train_records, data, config)
    val_loader = make_loader(dataset(val_records, data, config), config, shuffle=False)
    with Progress(disable=not progress) as bar:
        task = bar.add_task(
            f"{config.architecture} {config.mask_mode}",
            total=config.max_epochs,
            completed=start_epoch,
        )
        for epoch in range(start_epoch, config.max_epochs):
            if best_epoch >= 0 and epoch - best_epoch > config.patience:
                break
            began = time.perf_counter()
            network.train()
            losses = []
            for batch in make_loader(train_ds, config, shuffle=True, epoch=epoch):
                images = batch["image"].to(device, non_blocking=True)
                if on_gpu and config.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                targets = batch["label"].to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    logits = network(images)
                loss = loss_fn(logits.float(), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            if config.recalibrate_batchnorm:
                recalibrate_batchnorm(network, train_ds, config, device, amp)
            probs, labels = predict(network, val_loader, device, amp)
            value = macro_auroc(probs, labels)
            seconds += time.perf_counter() - began
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": float(np.mean(losses)),
                    "val_macro_auroc": value,
                    "seconds": seconds,
                }
            )
            if on_epoch is not None:
                on_epoch(history[-1])
            if np.isfinite(value) and value > best:
                best, best_epoch = value, epoch
                save_checkpoint(best_path, network.state_dict())
            state = {
                "model": network.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "history": history,
                "best": best,
                "best_epoch": best_epoch,
                "seconds": seconds,
            }
            save_checkpoint(last_path, state)
            bar.update(
                task,
                completed=epoch + 1,
                description=(f"{config.architecture} {config.mask_mode} val AUROC {value:.3f}"),
            )
    if best_epoch < 0:
        raise ValueError("Validation AUROC was never defined: the val split lacks positives.")
    epochs_run = len(history)
    write_json(
        run_dir / "summary.json",
        {
            "best_epoch": best_epoch,
            "best_val_macro_auroc": best,
            "epochs_run": epochs_run,
            "stopped_early": epochs_run < config.max_epochs,
            "training_seconds": seconds,
            "history": history,
        },
    )
    last_path.unlink()  # only resuming needs it (with Adam's moments: 3x the weights)
    return RunResult(run_dir, best_epoch, best, epochs_run, seconds)


def load_trained(
    run_dir: Path, device: torch.device | None = None
) -> tuple[torch.nn.Module, TrainConfig]:
    """The best weights of a finished (or interrupted) run and its config."""
    document = json.loads((run_dir / "config.json").read_text())
    config = TrainConfig.model_validate(document["train"])
    best = run_dir / "best.pt"
    if not best.is_file():
        raise FileNotFoundError(f"{run_dir} has no best.pt: the run never finished an epoch.")
    network = build_network(config.architecture, 5, pretrained=False)
    network.load_state_dict(torch.load(best, map_location="cpu", weights_only=True))
    return network.to(device or torch.device("cpu")).eval(), config
