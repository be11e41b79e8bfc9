"""Recipe: sequence classification with ``AutoModelForSequenceClassification`` (accuracy and F1, torchmetrics).

Data: a hub dataset name (``--data.dataset=glue --data.dataset_config=sst2``) or local csv/tsv/json/parquet
files (``--data.data_files='{train: train.tsv, validation: dev.tsv}'``) with configurable text/label columns
and a per-split ``column_map``. With no data and no checkpoint it runs the offline default: a tiny BERT built
from a config, a tokenizer trained on the fly and a deterministic synthetic sentiment task it can learn.

Run::

    tick-lightning run text_classification --trainer.max_epochs=1
    python recipes/text_classification.py fit --config recipes/configs/text_classification_sst2_local.yaml

Use the pieces in your own Trainer::

    data = TextClassificationData(data_files={"train": "train.tsv", "validation": "dev.tsv"}, tokenizer="dir")
    model = TextClassifier(checkpoint="dir")
    data.setup("fit"); model.build(data); L.Trainer(max_steps=100).fit(model, datamodule=data)
"""

from __future__ import annotations

import random
from typing import Any, Optional

import torch

from recipes._shared.cli import run_recipe
from recipes._shared.data import SplitsDataModule
from recipes._shared.errors import RecipeError, main_or_exit
from recipes._shared.hub import from_pretrained_or_error, load_pretrained_or_config
from recipes._shared.module import RecipeModule
from recipes._shared.tokenizer import train_tokenizer

RECIPE = "text_classification"
DEFAULT_MODEL_CONFIG = dict(model_type="bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=128, max_position_embeddings=128, hidden_dropout_prob=0.1,
                            attention_probs_dropout_prob=0.1)

_POS = "good great excellent wonderful superb delightful charming moving brilliant enjoyable".split()
_NEG = "bad awful terrible boring dull painful tedious clumsy weak mediocre".split()
_FILL = ("the film movie story plot actors cast director script scenes music ending it was is a and this with "
         "its but quite very rather overall long short first second new old").split()


def demo_sentiment(n: int, seed: int) -> dict[str, list]:
    """Deterministic synthetic sentiment data: label 1 when positive words outnumber negative ones.

    Example:
        >>> d = demo_sentiment(4, seed=0)
        >>> sorted(d), len(d["sentence"])
        (['label', 'sentence'], 4)
    """
    rng = random.Random(seed)
    sentences, labels = [], []
    for _ in range(n):
        label = rng.randint(0, 1)
        major, minor = (_POS, _NEG) if label else (_NEG, _POS)
        k_major = rng.randint(1, 3)
        k_minor = rng.randint(0, k_major - 1)
        words = [rng.choice(major) for _ in range(k_major)] + [rng.choice(minor) for _ in range(k_minor)]
        words += [rng.choice(_FILL) for _ in range(rng.randint(4, 12))]
        rng.shuffle(words)
        sentences.append(" ".join(words))
        labels.append(label)
    return {"sentence": sentences, "label": labels}


class TextClassificationData(SplitsDataModule):
    """Tokenized text classification splits from a hub dataset, local files, or the built-in demo data.

    Args:
        dataset: hub dataset name (``"glue"``, ``"stanfordnlp/sst2"``); None with no ``data_files`` = demo data.
        dataset_config: hub dataset config name (``"sst2"``).
        data_files: local files per split, ``{"train": "train.tsv", "validation": "dev.tsv"}``.
        format: ``csv``/``tsv``/``json``/``parquet``; default from the file suffix.
        text_column / text_pair_column / label_column: column names (after ``column_map``).
        column_map: renames, ``{old: new}`` for all splits or ``{split: {old: new}}`` (SST-2: dev has ``content``).
        train_split / val_split / test_split: split names (``test_split`` optional; None skips it).
        tokenizer: tokenizer name or dir (linked to ``--model.checkpoint`` by the CLI); None trains a word-level
            tokenizer on the training texts.
        max_train_samples / max_eval_samples: keep only the first N rows (quick runs).

    Example:
        >>> data = TextClassificationData(demo_train_size=64, demo_val_size=16, batch_size=8)
        >>> data.setup("fit"); batch = next(iter(data.train_dataloader()))
        >>> sorted(batch)[:2], data.num_labels
        (['attention_mask', 'input_ids'], 2)
    """

    columns_hint = " (--data.text_column, --data.text_pair_column, --data.label_column)"

    def __init__(self, dataset: Optional[str] = None, dataset_config: Optional[str] = None,
                 data_files: Optional[dict[str, str]] = None, format: Optional[str] = None,
                 text_column: str = "sentence", text_pair_column: Optional[str] = None, label_column: str = "label",
                 column_map: Optional[dict[str, Any]] = None, train_split: str = "train",
                 val_split: Optional[str] = "validation", test_split: Optional[str] = None,
                 tokenizer: Optional[str] = None, vocab_size: int = 2000, max_length: int = 128,
                 batch_size: int = 32, eval_batch_size: Optional[int] = None, num_workers: int = 0,
                 max_train_samples: Optional[int] = None, max_eval_samples: Optional[int] = None,
                 demo_train_size: int = 3000, demo_val_size: int = 400) -> None:
        if batch_size < 1 or max_length < 2:
            raise RecipeError(f"--data.batch_size={batch_size} must be >= 1 and --data.max_length={max_length} >= 2.")
        if format not in (None, "csv", "tsv", "json", "parquet"):
            raise RecipeError(f"--data.format={format!r} is not supported; choose csv, tsv, json or parquet.")
        super().__init__(dataset=dataset, dataset_config=dataset_config, data_files=data_files,
                         label_column=label_column, column_map=column_map, train_split=train_split,
                         val_split=val_split, test_split=test_split, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers,
                         max_train_samples=max_train_samples, max_eval_samples=max_eval_samples,
                         demo_train_size=demo_train_size, demo_val_size=demo_val_size)
        self.format = format
        self.text_column, self.text_pair_column = text_column, text_pair_column
        self.tokenizer_name, self.vocab_size, self.max_length = tokenizer, vocab_size, max_length
        self.tokenizer = None

    def file_format(self) -> Optional[str]:
        return self.format

    def _demo(self, n: int, seed: int):
        import datasets

        return datasets.Dataset.from_dict(demo_sentiment(n, seed))

    def _columns(self) -> list[Optional[str]]:
        return [self.text_column, self.text_pair_column, self.label_column]

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return  # idempotent: the CLI validates before fit, then Lightning calls setup again
        raw = {role: self._raw(role) for role in self.roles()}
        self._set_labels(raw)
        self.tokenizer = self._load_tokenizer(raw["train"])
        for role, ds in raw.items():
            self.splits[role] = self._tokenize(ds)

    def _set_labels(self, raw: dict) -> None:
        feature = raw["train"].features.get(self.label_column)
        values = set()
        for ds in raw.values():
            values.update(ds.unique(self.label_column))
        if feature is not None and hasattr(feature, "names"):  # ClassLabel from the hub
            self.label_names = list(feature.names)
        elif all(isinstance(v, (int, bool)) for v in values):
            bad = sorted(v for v in values if int(v) < 0)
            if bad:  # GLUE test splits use -1 for "no label"
                raise RecipeError(f"labels {bad} in column {self.label_column!r} are negative (unlabelled rows?); "
                                  "drop them or pick a labelled split.")
            self.label_names = [str(i) for i in range(int(max(values)) + 1)]
        else:
            self.label_names = sorted(str(v) for v in values)
        self.num_labels = len(self.label_names)
        self._label_index = {name: i for i, name in enumerate(self.label_names)}

    def _load_tokenizer(self, train_ds):
        if self.tokenizer_name:
            from transformers import AutoTokenizer

            return from_pretrained_or_error(AutoTokenizer, self.tokenizer_name, what="tokenizer")
        texts = list(train_ds[self.text_column]) + (list(train_ds[self.text_pair_column]) if self.text_pair_column else [])
        return train_tokenizer(texts, vocab_size=self.vocab_size)

    def _tokenize(self, ds):
        tok, label_col = self.tokenizer, self.label_column
        strings = self.label_names is not None and not all(n == str(i) for i, n in enumerate(self.label_names))

        def encode(batch):
            pair = batch[self.text_pair_column] if self.text_pair_column else None
            out = tok(batch[self.text_column], pair, truncation=True, max_length=self.max_length)
            labels = batch[label_col]
            out["labels"] = [self._label_index[str(v)] for v in labels] if strings else [int(v) for v in labels]
            return out

        return ds.map(encode, batched=True, remove_columns=ds.column_names, keep_in_memory=True)

    def _collate_fn(self, train: bool):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(self.tokenizer, return_tensors="pt")


class TextClassifier(RecipeModule):
    """``AutoModelForSequenceClassification`` from a checkpoint or a config; accuracy and macro F1.

    Args:
        checkpoint: hub name or local dir; None builds ``model_config`` from scratch (the tiny default).
        model_config: config overrides (needs ``model_type`` without a checkpoint).
        num_labels: expected label count; None takes it from the data (a mismatch is an error).
        peft: ``none``/``lora``/``ln_tuning``; ``lora_r``/``lora_alpha``/``lora_dropout`` for LoRA.
        layer_lr_decay: layer-wise lr decay in (0, 1]; 1 is off (see :func:`recipes._shared.optim.optimizer_param_groups`).

    Example:
        >>> data = TextClassificationData(demo_train_size=32, demo_val_size=8); data.setup("fit")
        >>> model = TextClassifier(); model.build(data); model.model.config.num_labels
        2
    """

    def __init__(self, checkpoint: Optional[str] = None, model_config: Optional[dict[str, Any]] = None,
                 num_labels: Optional[int] = None, lr: float = 1e-3, weight_decay: float = 0.01,
                 warmup_ratio: float = 0.06, peft: str = "none", lora_r: int = 8, lora_alpha: int = 16,
                 lora_dropout: float = 0.05, merge_lora: bool = True, fused: Optional[bool] = None,
                 layer_lr_decay: float = 1.0, gradient_checkpointing: bool = False) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio, peft=peft, merge_lora=merge_lora,
                         fused=fused, layer_lr_decay=layer_lr_decay, gradient_checkpointing=gradient_checkpointing)
        if num_labels is not None and num_labels < 1:
            raise RecipeError(f"--model.num_labels={num_labels} must be >= 1 (or unset to take it from the data).")
        self.checkpoint = checkpoint
        self.model_config = dict(DEFAULT_MODEL_CONFIG if model_config is None and checkpoint is None
                                 else (model_config or {}))
        self.num_labels = num_labels
        self.lora = dict(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout)
        self.save_hyperparameters()

    def build(self, datamodule: TextClassificationData) -> None:
        from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
        from transformers import AutoModelForSequenceClassification

        n = datamodule.num_labels
        if self.num_labels is not None and self.num_labels != n:
            raise RecipeError(f"--model.num_labels={self.num_labels} but the data has {n} labels "
                              f"{datamodule.label_names}; fix one of them (or leave num_labels unset).")
        tok = datamodule.tokenizer
        kwargs: dict[str, Any] = dict(num_labels=n, id2label=dict(enumerate(datamodule.label_names)),
                                      label2id={k: i for i, k in enumerate(datamodule.label_names)})
        if self.checkpoint is None:
            kwargs.update(vocab_size=len(tok), pad_token_id=tok.pad_token_id)
        else:
            kwargs["ignore_mismatched_sizes"] = True  # a new classification head for this label set
        model = load_pretrained_or_config(AutoModelForSequenceClassification, self.checkpoint, self.model_config,
                                          meta=self.build_on_meta, **kwargs)
        if model.config.pad_token_id is None and tok.pad_token_id is not None:
            model.config.pad_token_id = tok.pad_token_id  # GPT-style models need it to find the last token
        self.model = self.prepare_model(model, task_type="SEQ_CLS", **self.lora)
        self.preprocessor = tok
        self.metrics = torch.nn.ModuleDict({
            f"{stage}_{name}": metric
            for stage in ("val", "test")
            for name, metric in (("acc", MulticlassAccuracy(n, average="micro")),
                                 ("f1", MulticlassF1Score(n, average="macro")))})

    def forward(self, batch: dict) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self(batch).loss
        self.log_step_metric("train_loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch: dict, stage: str) -> None:
        out = self(batch)
        preds = out.logits.argmax(-1)
        self.log(f"{stage}_loss", out.loss, prog_bar=True, sync_dist=True)
        for name in ("acc", "f1"):
            metric = self.metrics[f"{stage}_{name}"]
            metric.update(preds, batch["labels"])
            self.log(f"{stage}_{name}", metric, prog_bar=name == "acc")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")


def cli(args: Optional[list[str]] = None):
    """Run the recipe and return the ``RecipeCLI`` (its ``model``, ``datamodule``, ``trainer``, ``run_dir``)."""
    return run_recipe(TextClassifier, TextClassificationData, RECIPE, args,
                      links=[("model.checkpoint", "data.tokenizer")],
                      default_max_epochs=1)


def main(args: Optional[list[str]] = None) -> None:
    """``python recipes/text_classification.py [fit] [--config FILE] [overrides]``; bad input exits with one ``error:`` line."""
    main_or_exit(cli, args)


if __name__ == "__main__":
    main()
