"""Recipe: causal language-model fine-tuning (``AutoModelForCausalLM``), full or LoRA (``peft``); perplexity.

Data: a hub dataset with a text column or a local text file (``--data.data_files='{train: shakespeare.txt}'``
with ``--data.val_fraction=0.1`` to hold out the end of it). Text is tokenized, concatenated and cut into
blocks of ``block_size`` tokens (the usual ``group_texts``). With no data and no checkpoint it runs the
offline default: a tiny Llama from a config, a word-level tokenizer trained on the fly and sentences from a
small deterministic grammar, which the model learns well below the uniform perplexity.

Run::

    tick-lightning run causal_lm
    tick-lightning run causal_lm --model.peft=lora --model.lora_r=8
    python recipes/causal_lm.py fit --config recipes/configs/causal_lm_shakespeare.yaml
"""

from __future__ import annotations

import random
from typing import Any, Optional

import lightning as L
import torch

from recipes._shared.cli import run_recipe
from recipes._shared.data import make_loader, prepare_split
from recipes._shared.errors import RecipeError, main_or_exit
from recipes._shared.hub import from_pretrained_or_error, load_pretrained_or_config
from recipes._shared.module import RecipeModule
from recipes._shared.tokenizer import train_tokenizer

RECIPE = "causal_lm"
DEFAULT_MODEL_CONFIG = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                            tie_word_embeddings=True)

_SUBJ = "the cat|the dog|a bird|my friend|the old man|a child|the teacher|our neighbour".split("|")
_VERB = "sees|likes|follows|finds|watches|helps".split("|")
_OBJ = "the ball|a red box|the garden|the river|a small house|the moon".split("|")
_END = "today|at night|in the morning|again|quietly".split("|")


def demo_text(n: int, seed: int) -> dict[str, list]:
    """Deterministic sentences of a small grammar (subject verb object [time] .), one per row.

    Example:
        >>> demo_text(2, seed=0)["text"][0].endswith(" .")
        True
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(_SUBJ), rng.choice(_VERB), rng.choice(_OBJ)]
        if rng.random() < 0.5:
            words.append(rng.choice(_END))
        rows.append(" ".join(words) + " .")
    return {"text": rows}


class CausalLMData(L.LightningDataModule):
    """Blocks of ``block_size`` token ids from a hub dataset, a local text file, or the built-in demo text.

    Args:
        dataset / dataset_config: hub dataset (``"karpathy/tiny_shakespeare"``); None with no files = demo.
        data_files: ``{"train": "a.txt", "validation": "b.txt"}`` (txt/json/csv/parquet with ``text_column``).
        val_fraction: hold out this fraction of the train blocks (the end) as validation, when there is no
            validation split (set ``val_split: null``).
        tokenizer: name or dir (linked to ``--model.checkpoint``); None trains ``tokenizer_kind`` on the text.

    Example:
        >>> data = CausalLMData(demo_train_size=64, demo_val_size=16, block_size=16, batch_size=4)
        >>> data.setup("fit"); tuple(next(iter(data.train_dataloader()))["input_ids"].shape)
        (4, 16)
    """

    def __init__(self, dataset: Optional[str] = None, dataset_config: Optional[str] = None,
                 data_files: Optional[dict[str, str]] = None, format: Optional[str] = None,
                 text_column: str = "text", column_map: Optional[dict[str, Any]] = None, train_split: str = "train",
                 val_split: Optional[str] = "validation", val_fraction: float = 0.0,
                 tokenizer: Optional[str] = None, tokenizer_kind: str = "wordlevel", vocab_size: int = 1000,
                 block_size: int = 64, batch_size: int = 16, num_workers: int = 0,
                 max_train_blocks: Optional[int] = None, max_eval_blocks: Optional[int] = None,
                 demo_train_size: int = 3000, demo_val_size: int = 300) -> None:
        super().__init__()
        if block_size < 2 or batch_size < 1:
            raise RecipeError(f"--data.block_size={block_size} must be >= 2 and --data.batch_size={batch_size} >= 1.")
        if not 0.0 <= val_fraction < 1.0:
            raise RecipeError(f"--data.val_fraction={val_fraction} must be in [0, 1).")
        if val_fraction > 0 and val_split:
            raise RecipeError("--data.val_fraction holds out part of train as validation; set --data.val_split=null "
                              f"with it (val_split is {val_split!r}).")
        self.dataset, self.dataset_config, self.data_files, self.format = dataset, dataset_config, data_files, format
        self.text_column, self.column_map = text_column, column_map
        self.splits_names = {"train": train_split, "validation": val_split}
        self.val_fraction = val_fraction
        self.tokenizer_name, self.tokenizer_kind, self.vocab_size = tokenizer, tokenizer_kind, vocab_size
        self.block_size, self.batch_size, self.num_workers = block_size, batch_size, num_workers
        self.max_train_blocks, self.max_eval_blocks = max_train_blocks, max_eval_blocks
        self.demo_train_size, self.demo_val_size = demo_train_size, demo_val_size
        self.tokenizer = None
        self.splits: dict[str, Any] = {}

    def _raw(self, role: str):
        import datasets

        n, seed = (self.demo_train_size, 0) if role == "train" else (self.demo_val_size, 1)
        return prepare_split(self.splits_names[role], demo=lambda: datasets.Dataset.from_dict(demo_text(n, seed)),
                             dataset=self.dataset, dataset_config=self.dataset_config, data_files=self.data_files,
                             format=self.format, column_map=self.column_map, columns=[self.text_column],
                             columns_hint=" (--data.text_column)")

    def _blocks(self, ds, split: str):
        tok, col, size = self.tokenizer, self.text_column, self.block_size

        def encode(batch):
            return {"ids": tok([t + "\n" for t in batch[col]], add_special_tokens=False)["input_ids"]}

        def group(batch):  # concatenate, then cut into full blocks (the remainder of each chunk is dropped)
            flat = [i for ids in batch["ids"] for i in ids]
            n = len(flat) // size * size
            return {"input_ids": [flat[i:i + size] for i in range(0, n, size)]}

        ids = ds.map(encode, batched=True, remove_columns=ds.column_names, keep_in_memory=True)
        blocks = ids.map(group, batched=True, batch_size=2000, remove_columns=["ids"], keep_in_memory=True)
        if len(blocks) == 0:
            raise RecipeError(f"split {split!r} has fewer than block_size={size} tokens; use more text or a smaller "
                              "--data.block_size.")
        return blocks

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        raw = {role: self._raw(role) for role in ("train", "validation") if self.splits_names[role]}
        if self.tokenizer_name:
            from transformers import AutoTokenizer

            self.tokenizer = from_pretrained_or_error(AutoTokenizer, self.tokenizer_name, what="tokenizer")
        else:
            self.tokenizer = train_tokenizer(raw["train"][self.text_column], vocab_size=self.vocab_size,
                                             kind=self.tokenizer_kind, add_cls_sep=False)
        self.splits = {role: self._blocks(ds, self.splits_names[role]) for role, ds in raw.items()}
        if self.val_fraction > 0:
            train = self.splits["train"]
            n_val = max(1, int(len(train) * self.val_fraction))
            if n_val >= len(train):
                raise RecipeError(f"--data.val_fraction={self.val_fraction} leaves no training blocks.")
            self.splits = {"train": train.select(range(len(train) - n_val)),
                           "validation": train.select(range(len(train) - n_val, len(train)))}
        for role, limit in (("train", self.max_train_blocks), ("validation", self.max_eval_blocks)):
            if limit is not None and role in self.splits:
                self.splits[role] = self.splits[role].select(range(min(limit, len(self.splits[role]))))
        for ds in self.splits.values():
            ds.set_format("torch", columns=["input_ids"])

    def _loader(self, role: str, shuffle: bool):
        if role not in self.splits:
            return None
        return make_loader(self.splits[role], self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("validation", False)


class CausalLM(RecipeModule):
    """``AutoModelForCausalLM`` from a checkpoint or a config, full fine-tuning or LoRA; perplexity (torchmetrics).

    Example:
        >>> data = CausalLMData(demo_train_size=32, demo_val_size=8, block_size=16); data.setup("fit")
        >>> model = CausalLM(peft="lora"); model.build(data)
        >>> sum(p.numel() for p in model.parameters() if p.requires_grad) < 20000
        True
    """

    def __init__(self, checkpoint: Optional[str] = None, model_config: Optional[dict[str, Any]] = None,
                 lr: float = 2e-3, weight_decay: float = 0.01, warmup_ratio: float = 0.05, peft: str = "none",
                 lora_r: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.0,
                 lora_target_modules: Optional[list[str]] = None, merge_lora: bool = True,
                 fused: Optional[bool] = None, layer_lr_decay: float = 1.0,
                 gradient_checkpointing: bool = False) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio, peft=peft, merge_lora=merge_lora,
                         fused=fused, layer_lr_decay=layer_lr_decay, gradient_checkpointing=gradient_checkpointing)
        self.checkpoint = checkpoint
        self.model_config = dict(DEFAULT_MODEL_CONFIG if model_config is None and checkpoint is None
                                 else (model_config or {}))
        self.lora = dict(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         target_modules=lora_target_modules)
        self.save_hyperparameters()

    def build(self, datamodule: CausalLMData) -> None:
        from torchmetrics.text import Perplexity
        from transformers import AutoModelForCausalLM

        tok = datamodule.tokenizer
        kwargs: dict[str, Any] = {}
        if self.checkpoint is None:
            kwargs.update(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=None)
        model = load_pretrained_or_config(AutoModelForCausalLM, self.checkpoint, self.model_config,
                                          meta=self.build_on_meta, **kwargs)
        if model.get_input_embeddings().num_embeddings < len(tok):
            raise RecipeError(f"the tokenizer has {len(tok)} tokens but the model's embedding has "
                              f"{model.get_input_embeddings().num_embeddings}; use the checkpoint's own tokenizer.")
        self.model = self.prepare_model(model, task_type="CAUSAL_LM", **self.lora)
        self.preprocessor = tok
        self.val_ppl = Perplexity()

    def forward(self, input_ids: torch.Tensor) -> Any:
        return self.model(input_ids=input_ids, labels=input_ids)  # HF shifts the labels inside

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self(batch["input_ids"]).loss
        self.log_step_metric("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        ids = batch["input_ids"]
        out = self(ids)
        self.val_ppl.update(out.logits[:, :-1].float(), ids[:, 1:])
        self.log("val_loss", out.loss, prog_bar=True, sync_dist=True)
        self.log("val_ppl", self.val_ppl, prog_bar=True)


def cli(args: Optional[list[str]] = None):
    """Run the recipe and return the ``RecipeCLI`` (its ``model``, ``datamodule``, ``trainer``, ``run_dir``)."""
    return run_recipe(CausalLM, CausalLMData, RECIPE, args, links=[("model.checkpoint", "data.tokenizer")],
                      default_max_epochs=2)


def main(args: Optional[list[str]] = None) -> None:
    """``python recipes/causal_lm.py [fit] [--config FILE] [overrides]``; bad input exits with one ``error:`` line."""
    main_or_exit(cli, args)


if __name__ == "__main__":
    main()
