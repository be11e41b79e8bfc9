"""image_classification recipe: local ImageFolder run, reload with the saved image processor, augmentation, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from recipes import image_classification as ic
from recipes._shared.errors import RecipeError

QUICK = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--data.batch_size=8",
         "--data.image_size=16", "--model.model_config={model_type: vit, patch_size: 4, hidden_size: 32, "
         "num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64}"]


def write_image_folder(root, per_class=6, seed=0):
    """An ImageFolder of tiny PNGs: <root>/<class>/<i>.png, classes from the demo task."""
    data = ic.demo_images(per_class * 4 * 3, seed=seed, size=16)
    counts = {}
    for image, label in zip(data["image"], data["label"]):
        name = ic.DEMO_CLASSES[label]
        if counts.get(name, 0) >= per_class:
            continue
        counts[name] = counts.get(name, 0) + 1
        (root / name).mkdir(parents=True, exist_ok=True)
        image.save(root / name / f"{counts[name]}.png")
    assert all(counts.get(name) == per_class for name in ic.DEMO_CLASSES)
    return root


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("image")
    train = write_image_folder(tmp / "data" / "train", per_class=6, seed=0)
    val = write_image_folder(tmp / "data" / "val", per_class=2, seed=1)
    run_dir = tmp / "run"
    cli = ic.cli(["fit", f"--run_dir={run_dir}", *QUICK, "--trainer.max_steps=3", "--tick.ticks=every:1",
                  f"--data.data_files={{train: {train}, validation: {val}}}"])
    return cli, run_dir, val


def test_image_folder_run_directory(folder_run):
    from tick_lightning.store import load_ticks

    cli, run_dir, _ = folder_run
    assert cli.datamodule.label_names == sorted(ic.DEMO_CLASSES)  # ImageFolder classes = sorted folder names
    assert len(cli.datamodule.splits["train"]) == 24 and len(cli.datamodule.splits["validation"]) == 8
    for part in ("config.yaml", "metrics.json", "checkpoints/last.ckpt", "model/config.json",
                 "model/preprocessor_config.json"):
        assert (run_dir / part).exists(), part
    ticks = load_ticks(run_dir / "ticks")
    assert sorted(ticks[(ticks.state == "loss") & (ticks.stat == "value")].step.unique()) == [0, 1, 2]
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 3


def test_saved_model_and_processor_reload_with_same_predictions(folder_run):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    cli, run_dir, val = folder_run
    model = AutoModelForImageClassification.from_pretrained(run_dir / "model").eval()
    processor = AutoImageProcessor.from_pretrained(run_dir / "model")
    files = sorted(val.glob("*/*.png"))
    pixels = processor(images=[Image.open(f).convert("RGB") for f in files], return_tensors="pt")["pixel_values"]
    # the recipe's eval pipeline (no augmentation) must produce the same inputs as the saved processor
    ours = cli.datamodule._collate([{"image": Image.open(f), "label": 0} for f in files], train=False)
    torch.testing.assert_close(ours["pixel_values"], pixels)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).logits, cli.model.model.eval()(pixel_values=pixels).logits,
                                   rtol=1e-5, atol=1e-5)
    assert model.config.id2label[0] == sorted(ic.DEMO_CLASSES)[0]


def test_augment_is_crop_and_flip_of_the_input():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    out = ic.augment(x, pad=0, generator=g)  # no padding: every image is either itself or its mirror
    for a, b in zip(out, x):
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))
    padded = ic.augment(x, pad=2, generator=torch.Generator().manual_seed(1))
    ref = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for a, p in zip(padded, ref):  # each output is some 6x6 window of the padded image, maybe mirrored
        windows = [p[:, i:i + 6, j:j + 6] for i in range(5) for j in range(5)]
        assert any(torch.equal(a, w) or torch.equal(a, w.flip(-1)) for w in windows)


def test_default_demo_data_is_learnable_signal():
    """The demo class is the square's colour: the mean colour alone separates the classes (no leakage of labels)."""
    d = ic.demo_images(64, seed=0, size=16)
    means = np.stack([np.asarray(im, dtype=np.float64).reshape(-1, 3).mean(0) for im in d["image"]])
    labels = np.array(d["label"])
    centroids = np.stack([means[labels == k].mean(0) for k in range(4)])
    nearest = np.argmin(((means[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (nearest == labels).mean() > 0.6


def test_empty_image_folder_is_a_clear_error(tmp_path):
    train = write_image_folder(tmp_path / "train", per_class=2)
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    (empty / "cat" / "notes.txt").write_text("no images here")
    run_dir = tmp_path / "bad"
    with pytest.raises(RecipeError, match=r"split 'validation' is empty"):
        ic.cli(["fit", f"--run_dir={run_dir}", *QUICK, f"--data.data_files={{train: {train}, validation: {empty}}}"])
    assert not run_dir.exists()


def test_label_count_mismatch(tmp_path):
    train = write_image_folder(tmp_path / "train", per_class=2)
    run_dir = tmp_path / "bad"
    with pytest.raises(RecipeError, match=r"num_labels=10 but the data has 4 classes"):
        ic.cli(["fit", f"--run_dir={run_dir}", *QUICK, "--model.num_labels=10", "--data.val_split=null",
                f"--data.data_files={{train: {train}}}"])
    assert not run_dir.exists()
