"""Recipe: image classification with ``AutoModelForImageClassification`` (ViT and others); accuracy.

Data: a hub dataset (``--data.dataset=uoft-cs/cifar10``) or local ImageFolders
(``--data.data_files='{train: data/train, validation: data/test}'``, one sub-folder per class). Images go
through the checkpoint's image processor (resize, rescale, normalize); train-time augmentation (random crop
with padding, horizontal flip) is done afterwards in torch on the processed batch. With no data and no
checkpoint it runs the offline default: a tiny ViT from a config on deterministic synthetic images.

Run::

    tick-lightning run image_classification
    python recipes/image_classification.py fit --config recipes/configs/image_classification_imagefolder.yaml
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from recipes._shared.cli import run_recipe
from recipes._shared.data import SplitsDataModule
from recipes._shared.errors import RecipeError, main_or_exit
from recipes._shared.hub import from_pretrained_or_error, load_pretrained_or_config
from recipes._shared.module import RecipeModule

RECIPE = "image_classification"
DEFAULT_MODEL_CONFIG = dict(model_type="vit", patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
DEMO_CLASSES = ["red", "green", "blue", "yellow"]
_DEMO_COLORS = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=np.float64)


def demo_images(n: int, seed: int, size: int = 32) -> dict[str, list]:
    """Deterministic synthetic images: grey noise with one coloured square at a random place; class = colour.

    (Invariant to the crops and flips of the augmentation, unlike a position-based task.)

    Example:
        >>> d = demo_images(4, seed=0)
        >>> d["image"][0].size, len(d["label"])
        ((32, 32), 4)
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n):
        label = int(rng.integers(0, len(DEMO_CLASSES)))
        x = rng.normal(0.45, 0.2, (size, size, 3))
        side = int(rng.integers(size // 4, size // 2 + 1))
        r, c = rng.integers(0, size - side + 1, 2)
        x[r:r + side, c:c + side] = 0.25 + 0.5 * _DEMO_COLORS[label] + rng.normal(0, 0.1, (side, side, 3))
        images.append(Image.fromarray((np.clip(x, 0, 1) * 255).astype(np.uint8)))
        labels.append(label)
    return {"image": images, "label": labels}


def augment(pixels: torch.Tensor, pad: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random crop (after reflect-padding by ``pad``) and random horizontal flip, per image, in torch.

    Example:
        >>> augment(torch.randn(2, 3, 8, 8), pad=1).shape
        torch.Size([2, 3, 8, 8])
    """
    b, _, h, w = pixels.shape
    if pad > 0:
        padded = F.pad(pixels, (pad, pad, pad, pad), mode="reflect")
        ys = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        xs = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        pixels = torch.stack([padded[i, :, y:y + h, x:x + w] for i, (y, x) in enumerate(zip(ys.tolist(), xs.tolist()))])
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), pixels.flip(-1), pixels)


def scratch_processor(image_size: int):
    """The image processor saved with a model trained from scratch: resize to ``image_size``, scale to [-1, 1]."""
    try:
        from transformers import ViTImageProcessorPil as Processor  # PIL backend: no torchvision needed
    except ImportError:  # older transformers
        from transformers import ViTImageProcessor as Processor
    return Processor(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


class ImageClassificationData(SplitsDataModule):
    """Image classification splits from a hub dataset, local ImageFolders, or the built-in demo images.

    Args:
        dataset / dataset_config: hub dataset; None with no ``data_files`` = demo data.
        data_files: ImageFolder per split, ``{"train": "cifar10/train", "validation": "cifar10/test"}``.
        image_column / label_column / column_map: column names (CIFAR-10 on the hub: ``img``/``label``).
        processor: image processor name or dir (linked to ``--model.checkpoint``); None = scale to [-1, 1].
        image_size: side of the images for a model from scratch (ignored with a processor).
        augment: random crop (pad = image_size // 8) and flip on training batches.

    Example:
        >>> data = ImageClassificationData(demo_train_size=8, demo_val_size=4, batch_size=4)
        >>> data.setup("fit"); batch = next(iter(data.train_dataloader()))
        >>> tuple(batch["pixel_values"].shape), data.num_labels
        ((4, 3, 32, 32), 4)
    """

    def __init__(self, dataset: Optional[str] = None, dataset_config: Optional[str] = None,
                 data_files: Optional[dict[str, str]] = None, image_column: str = "image",
                 label_column: str = "label", column_map: Optional[dict[str, Any]] = None,
                 train_split: str = "train", val_split: Optional[str] = "validation",
                 test_split: Optional[str] = None, processor: Optional[str] = None, image_size: int = 32,
                 augment: bool = True, batch_size: int = 32, eval_batch_size: Optional[int] = None,
                 num_workers: int = 0, max_train_samples: Optional[int] = None,
                 max_eval_samples: Optional[int] = None, demo_train_size: int = 512,
                 demo_val_size: int = 128) -> None:
        if batch_size < 1 or image_size < 4:
            raise RecipeError(f"--data.batch_size={batch_size} must be >= 1 and --data.image_size={image_size} >= 4.")
        super().__init__(dataset=dataset, dataset_config=dataset_config, data_files=data_files,
                         label_column=label_column, column_map=column_map, train_split=train_split,
                         val_split=val_split, test_split=test_split, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers,
                         max_train_samples=max_train_samples, max_eval_samples=max_eval_samples,
                         demo_train_size=demo_train_size, demo_val_size=demo_val_size)
        self.image_column = image_column
        self.processor_name, self.image_size, self.augment = processor, image_size, augment
        self.processor = None

    columns_hint = " (--data.image_column, --data.label_column)"
    shuffle_before_limit = True  # class folders are sorted: a row limit takes a mix of classes

    def file_format(self) -> Optional[str]:
        return "imagefolder" if self.data_files else None

    def _demo(self, n: int, seed: int):
        import datasets

        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=DEMO_CLASSES)})
        return datasets.Dataset.from_dict(demo_images(n, seed, self.image_size), features=features)

    def _columns(self) -> list[Optional[str]]:
        return [self.image_column, self.label_column]

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        self.splits = {role: self._raw(role) for role in self.roles()}
        feature = self.splits["train"].features.get(self.label_column)
        if feature is not None and hasattr(feature, "names"):
            self.label_names = list(feature.names)
            for role, ds in self.splits.items():
                other = ds.features[self.label_column]
                if getattr(other, "names", self.label_names) != self.label_names:
                    raise RecipeError(f"split {role!r} has classes {other.names} but 'train' has {self.label_names}; "
                                      "every split needs the same class folders.")
        else:
            values = sorted({int(v) for ds in self.splits.values() for v in ds.unique(self.label_column)})
            self.label_names = [str(i) for i in range(values[-1] + 1)]
        self.num_labels = len(self.label_names)
        if self.processor_name:
            from transformers import AutoImageProcessor

            self.processor = from_pretrained_or_error(AutoImageProcessor, self.processor_name, what="image processor")
        else:
            self.processor = scratch_processor(self.image_size)

    def _collate(self, rows: list[dict], train: bool) -> dict[str, torch.Tensor]:
        images = [row[self.image_column].convert("RGB") for row in rows]
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        if train and self.augment:
            pixels = augment(pixels, pad=max(1, pixels.shape[-1] // 8))
        return {"pixel_values": pixels, "labels": torch.tensor([int(row[self.label_column]) for row in rows])}

    def _collate_fn(self, train: bool):
        return lambda rows: self._collate(rows, train)


class ImageClassifier(RecipeModule):
    """``AutoModelForImageClassification`` from a checkpoint or a config; accuracy (torchmetrics).

    Example:
        >>> data = ImageClassificationData(demo_train_size=8, demo_val_size=4); data.setup("fit")
        >>> model = ImageClassifier(); model.build(data); model.model.config.num_labels
        4
    """

    def __init__(self, checkpoint: Optional[str] = None, model_config: Optional[dict[str, Any]] = None,
                 num_labels: Optional[int] = None, lr: float = 1e-3, weight_decay: float = 0.05,
                 warmup_ratio: float = 0.1, peft: str = "none", lora_r: int = 8, lora_alpha: int = 16,
                 lora_dropout: float = 0.05, merge_lora: bool = True, fused: Optional[bool] = None,
                 layer_lr_decay: float = 1.0, gradient_checkpointing: bool = False) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio, peft=peft, merge_lora=merge_lora,
                         fused=fused, layer_lr_decay=layer_lr_decay, gradient_checkpointing=gradient_checkpointing)
        if num_labels is not None and num_labels < 1:
            raise RecipeError(f"--model.num_labels={num_labels} must be >= 1 (or unset to take it from the data).")
        self.checkpoint, self.num_labels = checkpoint, num_labels
        self.model_config = dict(DEFAULT_MODEL_CONFIG if model_config is None and checkpoint is None
                                 else (model_config or {}))
        self.lora = dict(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout)
        self.save_hyperparameters()

    def build(self, datamodule: ImageClassificationData) -> None:
        from torchmetrics.classification import MulticlassAccuracy
        from transformers import AutoModelForImageClassification

        n = datamodule.num_labels
        if self.num_labels is not None and self.num_labels != n:
            raise RecipeError(f"--model.num_labels={self.num_labels} but the data has {n} classes "
                              f"{datamodule.label_names}; fix one of them (or leave num_labels unset).")
        kwargs: dict[str, Any] = dict(num_labels=n, id2label=dict(enumerate(datamodule.label_names)),
                                      label2id={k: i for i, k in enumerate(datamodule.label_names)})
        if self.checkpoint is None:
            kwargs.update(image_size=datamodule.image_size, num_channels=3)
        else:
            kwargs["ignore_mismatched_sizes"] = True
        model = load_pretrained_or_config(AutoModelForImageClassification, self.checkpoint, self.model_config,
                                          meta=self.build_on_meta, **kwargs)
        self.model = self.prepare_model(model, modules_to_save=["classifier"], **self.lora)
        self.preprocessor = datamodule.processor
        self.metrics = torch.nn.ModuleDict({f"{s}_acc": MulticlassAccuracy(n, average="micro") for s in ("val", "test")})

    def forward(self, batch: dict) -> Any:
        return self.model(pixel_values=batch["pixel_values"], labels=batch["labels"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self(batch).loss
        self.log_step_metric("train_loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch: dict, stage: str) -> None:
        out = self(batch)
        metric = self.metrics[f"{stage}_acc"]
        metric.update(out.logits.argmax(-1), batch["labels"])
        self.log(f"{stage}_loss", out.loss, prog_bar=True, sync_dist=True)
        self.log(f"{stage}_acc", metric, prog_bar=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")


def cli(args: Optional[list[str]] = None):
    """Run the recipe and return the ``RecipeCLI`` (its ``model``, ``datamodule``, ``trainer``, ``run_dir``)."""
    return run_recipe(ImageClassifier, ImageClassificationData, RECIPE, args,
                      links=[("model.checkpoint", "data.processor")], default_max_epochs=2)


def main(args: Optional[list[str]] = None) -> None:
    """``python recipes/image_classification.py [fit] [--config FILE] [overrides]``; bad input exits with one ``error:`` line."""
    main_or_exit(cli, args)


if __name__ == "__main__":
    main()
