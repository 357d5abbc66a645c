"""MedSAM fine-tuning on lung masks (the paper: RSUA, 292 pairs, box prompts).

Both backends of the pipeline (LiteMedSAM, MedSAM ViT-B) are fine-tuned through the
pipeline's own segmenter objects: `prepare` (the backend's resize / scale / pad, exactly
as at inference) and `decode_logits` (prompt encoder + mask decoder), so the weights that
come out see at inference what they saw in training.

Each lung of a ground-truth mask (the two largest connected components) is a prompt: its
bounding box with random jitter of each side (up to `box_jitter` of the box size), its own
mask as the target. Loss: Dice + binary cross-entropy on SAM's low-resolution logits
(MONAI DiceLoss). Validation: Dice and the 95th-percentile Hausdorff distance (MONAI
metrics) per lung, on the logit grid, without jitter. AdamW as in MedSAM.

A run folder holds `config.json`, `last.pt` while running (resumable) and `best.pt`: a
bare state dict that `segmentation.litemedsam_checkpoint` / `.medsam_checkpoint` accept.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import cv2
import numpy as np
import torch
from monai.losses import DiceLoss
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import Progress
from scipy import ndimage as ndi

from cxrbatch.config import SegmentationSettings
from cxrbatch.dicom.export import write_json
from cxrbatch.models.segmenter import load_segmenter
from cxrbatch_training.data import MaskPair
from cxrbatch_training.train import open_run_folder, save_checkpoint, versions

log = logging.getLogger(__name__)


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    backend: Literal["litemedsam", "medsam-vitb"] = "litemedsam"
    checkpoint: str = ""  # start weights; "" = the packaged LiteMedSAM
    epochs: Annotated[int, Field(ge=1)] = 10
    learning_rate: Annotated[float, Field(gt=0)] = 1e-4
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    batch_images: Annotated[int, Field(ge=1)] = 4  # gradient accumulation over images
    box_jitter: Annotated[float, Field(ge=0, le=0.5)] = 0.1
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    freeze_image_encoder: bool = False
    seed: int = 0
    device: str = "auto"


@dataclass(frozen=True)
class Prompt:
    box: np.ndarray  # x0, y0, x1, y1 in image pixels
    mask: np.ndarray  # bool, image size


def lung_prompts(mask: np.ndarray) -> list[Prompt]:
    """One prompt per lung: the two largest connected components of the mask."""
    labelled, count = ndi.label(mask)
    if count == 0:
        return []
    sizes = ndi.sum(mask, labelled, range(1, count + 1))
    prompts = []
    for index in np.argsort(sizes)[::-1][:2]:
        component = labelled == index + 1
        ys, xs = np.nonzero(component)
        box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)
        prompts.append(Prompt(box, component))
    return prompts


def jitter(
    box: np.ndarray, fraction: float, rng: np.random.Generator, shape: tuple[int, int]
) -> np.ndarray:
    if fraction <= 0:
        return box
    width, height = box[2] - box[0], box[3] - box[1]
    shift = rng.uniform(-fraction, fraction, 4) * np.array([width, height, width, height])
    moved = box + shift.astype(np.float32)
    rows, cols = shape
    moved = np.clip(moved, 0, [cols, rows, cols, rows]).astype(np.float32)
    if moved[2] - moved[0] < 2 or moved[3] - moved[1] < 2:
        return box
    return np.asarray(moved)


def split_pairs(
    pairs: list[MaskPair], val_fraction: float, seed: int
) -> tuple[list[MaskPair], list[MaskPair]]:
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_val = max(1, round(len(pairs) * val_fraction))
    val = [pairs[i] for i in sorted(order[:n_val])]
    train = [pairs[i] for i in sorted(order[n_val:])]
    if not train:
        raise ValueError(f"{len(pairs)} image/mask pairs are too few to fine-tune on.")
    return train, val


def _targets(prompts: list[Prompt], size: tuple[int, int], device: torch.device) -> torch.Tensor:
    rows, cols = size
    stacked = [
        cv2.resize(p.mask.astype(np.float32), (cols, rows), interpolation=cv2.INTER_AREA) > 0.5
        for p in prompts
    ]
    return torch.as_tensor(np.stack(stacked)[:, None].astype(np.float32), device=device)


def finetune(
    run_dir: Path,
    config: FinetuneConfig,
    pairs: list[MaskPair],
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune (or resume, or return a finished run); returns the summary."""
    document = {
        "finetune": config.model_dump(mode="json"),
        "pairs": len(pairs),
        "images": [str(p.image) for p in pairs],
    }
    done = open_run_folder(run_dir, document, {"versions": versions()})
    if done is not None:
        return done

    key = "medsam_checkpoint" if config.backend == "medsam-vitb" else "litemedsam_checkpoint"
    settings = SegmentationSettings.model_validate(
        # Training updates the eager network: a frozen CPU graph of it would be stale.
        {
            "backend": config.backend,
            "device": config.device,
            key: config.checkpoint,
            "optimize_cpu": False,
        }
    )
    segmenter = load_segmenter(settings)
    net = segmenter.network  # type: ignore[attr-defined]
    device = segmenter.device
    if config.freeze_image_encoder:
        for parameter in net.image_encoder.parameters():
            parameter.requires_grad_(False)
    optimizer = torch.optim.AdamW(
        [p for p in net.parameters() if p.requires_grad],
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
    )
    dice_loss = DiceLoss(sigmoid=True)
    bce = torch.nn.BCEWithLogitsLoss()
    train_pairs, val_pairs = split_pairs(pairs, config.val_fraction, config.seed)
    history: list[dict[str, float]] = []
    start, best, seconds = 0, -1.0, 0.0
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if last_path.is_file():
        state = torch.load(last_path, map_location="cpu", weights_only=False)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, best, seconds = state["history"], state["best"], state["seconds"]
        start = state["epoch"] + 1

    def forward(
        image: np.ndarray, prompts: list[Prompt], boxes: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prepared = segmenter.prepare(image)  # type: ignore[attr-defined]
        features = net.image_encoder(prepared.batch)
        scale = np.array([*prepared.scale_xy, *prepared.scale_xy], dtype=np.float32)
        logits, _ = segmenter.decode_logits(  # type: ignore[attr-defined]
            features, torch.as_tensor(boxes * scale, device=device)
        )
        rows, cols = prepared.valid_logit_size
        return logits[:, :, :rows, :cols].float(), _targets(prompts, (rows, cols), device)

    with Progress(disable=not progress) as bar:
        task = bar.add_task(f"fine-tune {config.backend}", total=config.epochs, completed=start)
        for epoch in range(start, config.epochs):
            began = time.perf_counter()
            rng = np.random.default_rng([config.seed, epoch])
            net.train()
            losses = []
            optimizer.zero_grad(set_to_none=True)
            order = rng.permutation(len(train_pairs))
            for step, index in enumerate(order, start=1):
                image, mask = train_pairs[int(index)].load()
                prompts = lung_prompts(mask)
                if not prompts:
                    continue
                boxes = np.stack(
                    [jitter(p.box, config.box_jitter, rng, mask.shape) for p in prompts]
                )
                logits, target = forward(image, prompts, boxes)
                loss = dice_loss(logits, target) + bce(logits, target)
                (loss / config.batch_images).backward()
                losses.append(loss.item())
                if step % config.batch_images == 0 or step == len(order):
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            net.eval()
            dice_metric = DiceMetric(include_background=True, reduction="mean")
            hd95_metric = HausdorffDistanceMetric(include_background=True, percentile=95)
            with torch.no_grad():
                for pair in val_pairs:
                    image, mask = pair.load()
                    prompts = lung_prompts(mask)
                    if not prompts:
                        continue
                    logits, target = forward(image, prompts, np.stack([p.box for p in prompts]))
                    predicted = (logits > 0).float()
                    dice_metric(predicted, target)
                    hd95_metric(predicted, target)
            val_dice = float(np.asarray(dice_metric.aggregate()).mean())
            val_hd95 = float(np.asarray(hd95_metric.aggregate()).mean())
            seconds += time.perf_counter() - began
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": float(np.mean(losses)) if losses else float("nan"),
                    "val_dice": val_dice,
                    "val_hd95_logit_px": val_hd95,
                    "seconds": seconds,
                }
            )
            if val_dice > best:
                best = val_dice
                save_checkpoint(best_path, net.state_dict())
            state = {
                "model": net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "history": history,
                "best": best,
                "seconds": seconds,
            }
            save_checkpoint(last_path, state)
            bar.update(
                task,
                completed=epoch + 1,
                description=f"fine-tune {config.backend} val Dice {val_dice:.3f}",
            )
    summary = {
        "best_val_dice": best,
        "train_pairs": len(train_pairs),
        "val_pairs": len(val_pairs),
        "training_seconds": seconds,
        "history": history,
        "checkpoint": str(best_path),
        "use_with": f"segmentation.{key} = {str(best_path)!r}",
    }
    write_json(run_dir / "summary.json", summary)
    last_path.unlink(missing_ok=True)  # only resuming needs it
    return summary
