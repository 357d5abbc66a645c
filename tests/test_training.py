"""Training subsystem: metrics against scikit-learn, shared preprocessing, datasets, a tiny
training run that learns and resumes, the study runner, and an exported bundle giving the
same probabilities in `cxrbatch process` as in the training evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pydicom import dcmread
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from cxrbatch import pipeline
from cxrbatch.config import Settings, load_settings
from cxrbatch.dicom.decode import decode
from cxrbatch.dicom.discover import discover
from cxrbatch.models.bundle import IMAGENET_MEAN, IMAGENET_STD, load_bundle
from cxrbatch.models.preprocess import classifier_input
from cxrbatch_training import metrics
from cxrbatch_training.data import (
    Record,
    load_gray,
    lung_mask_pairs,
    read_curated,
    resolve_images,
    save_mask,
    split_records,
)
from cxrbatch_training.maskgen import generate_masks, mask_path
from cxrbatch_training.phantoms import IMAGES, TRUTH_MASKS, PhantomRecipe, write_phantom_dataset
from cxrbatch_training.synthetic import make_phantom, save, to_dataset
from cxrbatch_training.train import SMALL_CPU, DataSpec, TrainConfig, train

# --- metrics -------------------------------------------------------------------------


@pytest.fixture()
def predictions() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    labels = (rng.random((300, 5)) < 0.3).astype(int)
    probs = np.clip(labels * 0.25 + rng.random((300, 5)) * 0.75, 0, 1)
    return probs, labels


def test_auroc_and_thresholds_match_scikit_learn(
    predictions: tuple[np.ndarray, np.ndarray],
) -> None:
    probs, labels = predictions
    expected = [roc_auc_score(labels[:, k], probs[:, k]) for k in range(5)]
    np.testing.assert_allclose(metrics.per_label_auroc(probs, labels), expected, atol=1e-12)
    assert metrics.macro_auroc(probs, labels) == pytest.approx(
        roc_auc_score(labels, probs, average="macro"), abs=1e-12
    )
    thresholds = metrics.f1_optimal_thresholds(probs, labels)
    at = metrics.threshold_metrics(probs, labels, thresholds)
    for k in range(5):
        predicted = probs[:, k] >= thresholds[k]
        assert at["precision"][k] == pytest.approx(precision_score(labels[:, k], predicted))
        assert at["recall"][k] == pytest.approx(recall_score(labels[:, k], predicted))
        assert at["f1"][k] == pytest.approx(f1_score(labels[:, k], predicted))
        # F1-optimal: no other cut on these scores does better.
        best = max(f1_score(labels[:, k], probs[:, k] >= t) for t in np.unique(probs[:, k]))
        assert at["f1"][k] == pytest.approx(best)


def test_no_finding_score_is_one_minus_max(predictions: tuple[np.ndarray, np.ndarray]) -> None:
    probs, labels = predictions
    score = metrics.no_finding_score(probs)
    np.testing.assert_array_equal(score, 1.0 - probs.max(axis=1))
    no_finding = (labels.max(axis=1) == 0).astype(int)
    assert metrics.auroc(score, no_finding) == pytest.approx(roc_auc_score(no_finding, score))
    assert np.isnan(metrics.auroc(score, np.zeros(len(score))))


def test_screening_threshold_keeps_the_sensitivity() -> None:
    # 100 abnormal images with No Finding scores 0.00 .. 0.99, 50 normals at 0.5 .. 0.99.
    abnormal_scores = np.arange(100) / 100
    normal_scores = 0.5 + np.arange(50) / 100
    scores = np.concatenate([abnormal_scores, normal_scores])
    abnormal = np.concatenate([np.ones(100), np.zeros(50)]).astype(int)
    t98 = metrics.screening_threshold(scores, abnormal, 0.98)
    # Two abnormal images (0.98, 0.99) may be called normal: the cut lies just above 0.97.
    assert 0.97 < t98 <= 0.98
    assert metrics.sensitivity_at(scores, abnormal, t98) == pytest.approx(0.98)
    t99 = metrics.screening_threshold(scores, abnormal, 0.99)
    assert 0.98 < t99 <= 0.99 and metrics.sensitivity_at(scores, abnormal, t99) == 0.99
    (point,) = metrics.screening_points(scores, abnormal, scores, abnormal, (0.98,))
    assert point.test_sensitivity == pytest.approx(0.98)
    assert point.test_normals_auto_triaged == pytest.approx(2 / 50)  # 0.98, 0.99


def test_paired_tests_and_bootstrap() -> None:
    from scipy import stats

    a, b = [0.80, 0.81, 0.79, 0.82, 0.80], [0.82, 0.83, 0.80, 0.85, 0.81]
    result = metrics.paired_tests(a, b)
    assert result["mean_difference"] == pytest.approx(0.018)
    assert result["t_test_p"] == pytest.approx(stats.ttest_rel(b, a).pvalue)
    rng = np.random.default_rng(0)
    truth = (rng.random(400) < 0.5).astype(int)
    score = truth * 0.3 + rng.random(400)
    low, high = metrics.bootstrap_ci(metrics.auroc, [score, truth], resamples=300)
    assert low < metrics.auroc(score, truth) < high
    assert high - low < 0.15


# --- one preprocessing for PNG and DICOM -----------------------------------------------


def test_dicom_and_its_windowed_8bit_export_give_the_same_network_input(
    tmp_path: Path,
) -> None:
    """A 12-bit DICOM through the daemon's decoder and the 8-bit PNG a PACS export makes
    of it with the same window (PS3.3 C.11.2.1.2, computed here independently) give the
    same classifier input, masked or not."""
    phantom = make_phantom(5, (512, 512), {"Mass": 1})
    ds = to_dataset(phantom, "prep", bits=12)
    ds.WindowCenter, ds.WindowWidth = 1800, 3000  # a window narrower than the data
    dicom_path = save(ds, tmp_path / "in" / "image.dcm")
    (study,), _ = discover(tmp_path / "in")
    decoded, _ = decode(study.instances[0])

    stored = dcmread(dicom_path).pixel_array.astype(np.float64)
    c, w = 1800.0, 3000.0
    windowed = np.clip(((stored - (c - 0.5)) / (w - 1) + 0.5), 0, 1)
    png = tmp_path / "export.png"
    cv2.imwrite(str(png), np.round(windowed * 255).astype(np.uint8))
    exported = load_gray(png)

    lungs = phantom.right_lung | phantom.left_lung
    for mode in ("original", "M-50"):
        a = classifier_input(decoded.pixels, lungs, mode, 512, IMAGENET_MEAN, IMAGENET_STD)
        b = classifier_input(exported, lungs, mode, 512, IMAGENET_MEAN, IMAGENET_STD)
        assert a.shape == (3, 512, 512)
        # At most one grey level apart anywhere (rounding), identical almost everywhere.
        assert np.abs(a - b).max() <= 1.0 / 255 / min(IMAGENET_STD) + 1e-6
        assert (np.abs(a - b) > 1e-6).mean() < 0.001
    # A 16-bit PNG of the same export gives the same input as the 8-bit one.
    png16 = tmp_path / "export16.png"
    cv2.imwrite(str(png16), np.round(windowed * 65535).astype(np.uint16))
    np.testing.assert_array_equal(load_gray(png16), exported)


# --- datasets ----------------------------------------------------------------------------


def test_missing_files_and_columns_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Curated table not found"):
        read_curated(tmp_path / "none.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("Image Index,Patient ID\nx.png,1\n")
    with pytest.raises(ValueError, match="lacks the columns"):
        read_curated(bad)
    (tmp_path / "images").mkdir()
    record = Record("00000001_000.png", "1", (1, 0, 0, 0, 0), 0, "train")
    with pytest.raises(FileNotFoundError, match="1 of 1 images of the table are not under"):
        resolve_images([record], tmp_path / "images")


def test_montgomery_layout_unions_the_lung_folders(tmp_path: Path) -> None:
    image = np.zeros((64, 64), np.uint8)
    left, right = np.zeros((64, 64), bool), np.zeros((64, 64), bool)
    left[10:50, 5:25], right[10:50, 40:60] = True, True
    (tmp_path / "CXR_png").mkdir()
    cv2.imwrite(str(tmp_path / "CXR_png" / "MCUCXR_0001_0.png"), image)
    cv2.imwrite(str(tmp_path / "CXR_png" / "MCUCXR_0002_0.png"), image)  # no masks: skipped
    save_mask(left, tmp_path / "ManualMask" / "leftMask" / "MCUCXR_0001_0.png")
    save_mask(right, tmp_path / "ManualMask" / "rightMask" / "MCUCXR_0001_0.png")
    (pair,) = lung_mask_pairs(
        tmp_path / "CXR_png",
        [tmp_path / "ManualMask" / "leftMask", tmp_path / "ManualMask" / "rightMask"],
    )
    _, mask = pair.load()
    np.testing.assert_array_equal(mask, left | right)


# --- training ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Record], DataSpec]:
    root = tmp_path_factory.mktemp("phantom_dataset")
    recipe = PhantomRecipe(seed=11, counts={"train": 48, "val": 32, "test": 32}, size=128)
    records = write_phantom_dataset(root, recipe)
    assert read_curated(root / "curated.csv") == records
    data = DataSpec(resolve_images(records, root / IMAGES), root / TRUTH_MASKS, True, "test")
    return records, data


TINY = SMALL_CPU.model_copy(
    update={"mask_mode": "M-50", "input_size": 32, "max_epochs": 3, "device": "cpu"}
)


def test_an_interrupted_run_resumes_to_the_same_weights(
    tmp_path: Path, tiny_dataset: tuple[list[Record], DataSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    import cxrbatch_training.train as train_module

    records, data = tiny_dataset
    train_set, val_set = split_records(records, "train"), split_records(records, "val")
    whole = train(tmp_path / "whole", TINY, data, train_set, val_set, progress=False)
    assert whole.epochs_run == 3
    for name in ("config.json", "best.pt", "summary.json"):
        assert (tmp_path / "whole" / name).is_file()
    config = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert config["train"]["learning_rate"] == 1e-3 and "torch" in config["versions"]

    calls = []
    real_predict = train_module.predict

    def killed_in_second_validation(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_predict(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(train_module, "predict", killed_in_second_validation)
    with pytest.raises(KeyboardInterrupt):  # killed during its second epoch
        train(tmp_path / "cut", TINY, data, train_set, val_set, progress=False)
    monkeypatch.setattr(train_module, "predict", real_predict)
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=False)["epoch"] == 0
    assert not (tmp_path / "cut" / "summary.json").exists()
    resumed = train(tmp_path / "cut", TINY, data, train_set, val_set, progress=False)
    assert resumed.epochs_run == 3
    history = [
        json.loads((tmp_path / d / "summary.json").read_text())["history"] for d in ("whole", "cut")
    ]
    assert [h["val_macro_auroc"] for h in history[0]] == [h["val_macro_auroc"] for h in history[1]]
    a = torch.load(tmp_path / "whole" / "best.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "best.pt", weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    assert not (tmp_path / "whole" / "last.pt").exists()  # removed once finished
    # A finished run returns at once; a different config in the same folder is refused.
    assert train(tmp_path / "whole", TINY, data, train_set, val_set, False) == whole
    with pytest.raises(ValueError, match="another config"):
        train(
            tmp_path / "whole",
            TINY.model_copy(update={"learning_rate": 1e-4}),
            data,
            train_set,
            val_set,
            False,
        )


def test_cli_trains_evaluates_and_exports_a_run(
    tmp_path: Path, tiny_dataset: tuple[list[Record], DataSpec]
) -> None:
    """`cxrbatch training train | evaluate | export` (each with --run) end to end."""
    from cxrbatch_training.__main__ import main

    _, data = tiny_dataset
    assert data.masks is not None
    root = data.masks.parent
    common = [
        "--table",
        str(root / "curated.csv"),
        "--images",
        str(root / IMAGES),
        "--masks",
        str(data.masks),
        "--synthetic",
        "--device",
        "cpu",
    ]
    run = str(tmp_path / "run")
    assert (
        main(
            [
                "train",
                *common,
                "--run",
                run,
                "--mask-mode",
                "M-50",
                "--input-size",
                "32",
                "--batch-size",
                "16",
                "--epochs",
                "1",
                "--no-imagenet",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    assert main(["evaluate", *common, "--run", run]) == 0
    assert main(["export", "--run", run, "--bundle", str(tmp_path / "b"), "--name", "t"]) == 0
    bundle = load_bundle(tmp_path / "b", "cpu")
    assert bundle.spec.mask_mode == "M-50" and bundle.model.synthetic_training_data


def test_study_runner_writes_tables_tests_and_plots(tmp_path: Path) -> None:
    from cxrbatch_training.study import run_study, synthetic_small_config

    config = synthetic_small_config(
        architectures=("resnet50",),
        mask_modes=("original", "M-50"),
        splits=(0, 1),
        phantom_counts={"train": 32, "val": 24, "test": 24},
        phantom_size=128,
        train=TINY.model_copy(update={"max_epochs": 1, "mask_mode": "original"}),
    )
    report = run_study(config, tmp_path)
    assert {(r["architecture"], r["mask_mode"]) for r in report["settings"]} == {
        ("resnet50", "original"),
        ("resnet50", "M-50"),
    }
    assert all(r["splits"] == 2 for r in report["settings"])
    (test,) = [t for t in report["paired_tests"] if t["metric"] == "no_finding_auroc"]
    assert test["comparison"] == "M-50 - original" and test["n"] == 2
    markdown = (tmp_path / "study.md").read_text()
    assert "SYNTHETIC DATA" in markdown and "| resnet50 | M-50 |" in markdown
    for name in ("study_settings.csv", "paired_tests.csv", "study_runs.csv", "study.json"):
        assert (tmp_path / name).is_file()
    assert (tmp_path / "runs" / "split_1" / "resnet50_M-50" / "evaluation.json").is_file()


# --- the demo bundle: learns, exports, and runs in the daemon's pipeline -----------------


def test_demo_bundle_learned_and_is_marked_synthetic(demo_bundle: Path) -> None:
    metadata = json.loads((demo_bundle / "configs" / "metadata.json").read_text())
    assert metadata["cxrbatch"]["training_data"]["synthetic"] is True
    assert "SYNTHETIC" in metadata["description"]
    # Held-out phantoms (80): well above chance for the five findings and No Finding
    # (measured here: macro 0.70, No Finding 0.77; Edema 1.0, Nodule and Fibrosis ~0.5 at
    # 64 px, where nodules and the reticular pattern are below the resolution).
    assert metadata["metrics"]["macro_auroc"] > 0.62
    assert metadata["metrics"]["no_finding_auroc"] > 0.65
    assert 0.0 < metadata["cxrbatch"]["screening"]["no_finding_threshold"] < 1.0
    bundle = load_bundle(demo_bundle, "cpu")
    assert bundle.model.synthetic_training_data and bundle.spec.mask_mode == "M-50"


def test_exported_bundle_gives_the_training_probabilities_in_process(
    tmp_path: Path, demo_bundle: Path, settings: Settings, models: pipeline.Models
) -> None:
    """Phantoms as 8-bit PNGs (what training reads) and as DICOM (what the daemon reads):
    the training code's prediction with the segmenter's cached masks equals what
    `cxrbatch process` records with the exported bundle."""
    from cxrbatch_training.train import dataset, make_loader, predict

    images, records, uids = {}, [], {}
    for i in range(3):
        phantom = make_phantom(900 + i, (384, 384))
        pixels = np.round(phantom.image * 255).astype(np.uint8)
        name = f"case{i}.png"
        images[name] = tmp_path / "png" / name
        images[name].parent.mkdir(exist_ok=True)
        cv2.imwrite(str(images[name]), pixels)
        ds = to_dataset(phantom, f"equal/{i}", bits=8)
        # 8 bits with an identity window: the decoder gives back exactly the PNG's values.
        ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 127.5, 255, "LINEAR_EXACT"
        save(ds, tmp_path / "dicom" / f"case{i}" / "image.dcm")
        uids[str(ds.StudyInstanceUID)] = i
        records.append(Record(name, str(i), (0,) * 5, 1, "test"))
    cache = tmp_path / "masks"
    assert generate_masks(images, cache, settings.segmentation, models.segmenter, False) == {}
    assert all(mask_path(cache, name).is_file() for name in images)

    bundle = load_bundle(demo_bundle, "cpu")
    config = TrainConfig(architecture="resnet50", mask_mode="M-50", input_size=64, num_workers=0)
    data = DataSpec(images, cache, True, "equality check")
    loader = make_loader(dataset(records, data, config), config, shuffle=False)
    trained, _ = predict(bundle.network, loader, torch.device("cpu"))

    configured = load_settings(
        None,
        segmentation={"device": "cpu"},
        classifier={"device": "cpu", "bundle": str(demo_bundle)},
    )
    loaded = pipeline.Models(models.segmenter, bundle, None)
    studies, _ = discover(tmp_path / "dicom")
    processed = np.zeros_like(trained)
    for study in studies:
        result = pipeline.run(study, loaded, configured, tmp_path / "out")
        (image,) = result.images
        assert image.findings is not None and image.findings.model.synthetic_training_data
        probabilities = image.findings.probabilities
        processed[uids[study.study_instance_uid]] = [probabilities[k] for k in bundle.spec.labels]
    np.testing.assert_allclose(processed, trained, atol=1e-5)
    document = json.loads(next((tmp_path / "out").rglob("result.json")).read_text())
    assert "SYNTHETIC" in json.dumps(document)


# --- MedSAM fine-tuning --------------------------------------------------------------------


def test_litemedsam_fine_tunes_on_an_image_mask_folder_and_plugs_into_the_pipeline(
    tmp_path: Path,
) -> None:
    from cxrbatch.models.prompts import segment_pixels
    from cxrbatch.models.segmenter import LiteMedSAM
    from cxrbatch_training.finetune import FinetuneConfig, finetune, lung_prompts

    truths = []
    for i in range(5):  # RSUA / Shenzhen layout: images/name.png, masks/name_mask.png
        phantom = make_phantom(700 + i, (256, 256))
        lungs = phantom.right_lung | phantom.left_lung
        truths.append(lungs)
        cv2.imwrite(str(tmp_path / f"case{i}.png"), np.round(phantom.image * 255).astype(np.uint8))
        save_mask(lungs, tmp_path / "masks" / f"case{i}_mask.png")
    (tmp_path / "images").mkdir()
    for i in range(5):
        (tmp_path / f"case{i}.png").rename(tmp_path / "images" / f"case{i}.png")
    pairs = lung_mask_pairs(tmp_path / "images", [tmp_path / "masks"])
    assert len(pairs) == 5 and len(lung_prompts(pairs[0].load()[1])) == 2

    config = FinetuneConfig(epochs=1, batch_images=2, val_fraction=0.4, device="cpu")
    summary = finetune(tmp_path / "run", config, pairs, progress=False)
    assert summary["train_pairs"] == 3 and summary["val_pairs"] == 2
    (epoch,) = summary["history"]
    assert epoch["val_dice"] > 0.85 and np.isfinite(epoch["val_hd95_logit_px"])
    assert not (tmp_path / "run" / "last.pt").exists()

    tuned = LiteMedSAM(str(tmp_path / "run" / "best.pt"), "cpu")
    assert tuned.model.version == "fine-tuned" and len(tuned.model.sha256) == 64
    image = load_gray(pairs[0].image)
    found = segment_pixels(tuned, image).lungs
    truth = truths[int(pairs[0].image.stem[-1])]
    dice = 2 * (found & truth).sum() / (found.sum() + truth.sum())
    assert dice > 0.9
