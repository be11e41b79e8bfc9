"""Sequential recommendation: next-item prediction on a Hugging Face backbone (SASRec / BERT4Rec style).

Run it (offline default: synthetic interactions with planted sequential structure, about a minute on CPU)::

    python recipes/sequential_recommendation.py fit
    tick-lightning run sequential_recommendation --config recipes/configs/sequential_recommendation_games.yaml

Evaluation is leave-one-out (last item test, second-to-last validation) with two protocols, both logged:
``hr@k`` / ``ndcg@k`` rank the target against ``num_eval_negatives`` (100) sampled items the user never
interacted with; ``full_hr@k`` / ``full_ndcg@k`` rank it against every item, the user's seen items masked.
See docs/recommendation.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from recipes._shared.cli import run_recipe
from recipes._shared.errors import RecipeError, main_or_exit
from recipes._shared.module import build_once, log_step_metric
from recipes._shared.optim import use_fused_optimizer
from recipes._shared.schedule import with_warmup_cosine
from recipes._shared.sharding import shard_for_strategy
from recipes.recsys.data import (
    FORMATS,
    EvalDataset,
    Interactions,
    TrainDataset,
    collate_eval,
    filter_short,
    leave_one_out,
    load_interactions,
    sample_negatives,
)
from recipes.recsys.metrics import rank_metrics, target_rank
from recipes.recsys.model import BACKBONES, INITS, LOSSES, SeqRecModel
from recipes.recsys.synthetic import synthetic_interactions

LR_SCHEDULES = ("constant", "cosine")

__all__ = ["SequentialRecommendationData", "SequentialRecommender", "main"]


class SequentialRecommendationData(L.LightningDataModule):
    """Interactions -> leave-one-out split -> train rows (fresh negatives every epoch) and evaluation rows.

    Args:
        path: SASRec ``user item`` text, or csv/parquet with user/item/timestamp columns; ``None`` = synthetic.
        format: one of ``auto, sasrec, csv, parquet`` (auto: by suffix; .txt and others are SASRec text).
        user_col, item_col, time_col: column names of a csv/parquet table (``time_col=None`` keeps file order).
        min_interactions: users with fewer are dropped (count reported); >= 3 for leave-one-out.
        max_len: the most recent items a sequence keeps (SASRec: 50).
        batch_size, eval_batch_size: loader batch sizes.
        num_eval_negatives: sampled negatives of the sampled protocol (100, seeded by ``seed``).
        eval_users: evaluate a seeded sample of this many users (the original SASRec code uses 10,000 when
            there are more); ``None`` evaluates every user.
        synthetic_users, synthetic_items, synthetic_p_follow: the synthetic generator (when ``path`` is None).
        seed: seeds the evaluation negatives, the user sample and the training negatives.

    Example:
        >>> dm = SequentialRecommendationData(synthetic_users=50, synthetic_items=30, num_eval_negatives=10)
        >>> dm.setup("fit"); dm.num_items
        30
    """

    def __init__(
        self,
        path: str | None = None,
        format: str = "auto",
        user_col: str = "user",
        item_col: str = "item",
        time_col: str | None = "timestamp",
        min_interactions: int = 3,
        max_len: int = 20,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_eval_negatives: int = 100,
        eval_users: int | None = None,
        synthetic_users: int = 1000,
        synthetic_items: int = 200,
        synthetic_p_follow: float = 0.8,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if format not in FORMATS:
            raise RecipeError(f"--data.format={format!r} is not supported; choose one of {list(FORMATS)}.")
        if path is not None and not Path(path).is_file():
            raise RecipeError(f"--data.path={path!r} does not exist (or is not a file); pass an interaction file "
                              "(SASRec 'user item' text, csv or parquet) or leave it unset for synthetic data.")
        for name, value, low in (("min_interactions", min_interactions, 3), ("max_len", max_len, 2),
                                 ("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1),
                                 ("num_eval_negatives", num_eval_negatives, 1), ("num_workers", num_workers, 0)):
            if not isinstance(value, int) or value < low:
                raise RecipeError(f"--data.{name}={value!r} must be an integer >= {low}.")
        if eval_users is not None and eval_users < 1:
            raise RecipeError(f"--data.eval_users={eval_users!r} must be >= 1 or null (all users).")
        self.save_hyperparameters()
        self.path, self.format, self.cols = path, format, (user_col, item_col, time_col)
        self.min_interactions, self.max_len = min_interactions, max_len
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.num_eval_negatives, self.eval_users, self.seed = num_eval_negatives, eval_users, seed
        self.synthetic = {"num_users": synthetic_users, "num_items": synthetic_items, "p_follow": synthetic_p_follow,
                              "seed": seed}
        self.interactions: Interactions | None = None

    # -- loading (idempotent: RecipeCLI calls setup before training to validate, Lightning calls it again)
    def setup(self, stage: str = "fit") -> None:
        if self.interactions is not None:
            return
        try:
            if self.path is None:
                data = synthetic_interactions(**self.synthetic)
            else:
                data = load_interactions(self.path, self.format, *self.cols)
            data = filter_short(data, self.min_interactions)
            split = leave_one_out(data.sequences)
            # negatives exclude every item the user interacted with (train, valid and test)
            valid_neg = sample_negatives(data.sequences, data.num_items, self.num_eval_negatives, self.seed)
            test_neg = sample_negatives(data.sequences, data.num_items, self.num_eval_negatives, self.seed + 1)
        except (ValueError, FileNotFoundError) as err:
            raise RecipeError(str(err)) from err
        users = np.arange(data.num_users)
        if self.eval_users is not None and self.eval_users < data.num_users:
            users = np.sort(np.random.default_rng(self.seed).choice(data.num_users, self.eval_users, replace=False))
        self.interactions, self.split, self.eval_user_index = data, split, users
        test_hist = [np.append(t, v) for t, v in zip(split.train, split.valid)]
        self.train_set = TrainDataset(split.train, data.num_items, self.max_len, seed=self.seed)
        self.valid_set = EvalDataset(split.train, split.valid, valid_neg, self.max_len, users)
        self.test_set = EvalDataset(test_hist, split.test, test_neg, self.max_len, users)
        rank_zero_info(
            f"interactions: {data.num_users} users ({data.dropped_users} dropped with < {self.min_interactions}), "
            f"{data.num_items} items, {data.num_interactions} interactions; {len(self.train_set)} training rows, "
            f"{len(users)} evaluation users"
        )

    @property
    def num_items(self) -> int:
        if self.interactions is None:
            self.setup()
        return self.interactions.num_items

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
                          drop_last=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.valid_set, batch_size=self.eval_batch_size, collate_fn=collate_eval,
                          num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.eval_batch_size, collate_fn=collate_eval,
                          num_workers=self.num_workers)

    def has_test(self) -> bool:
        return True


class SequentialRecommender(L.LightningModule):
    """Next-item prediction with a GPT-2 (SASRec) or BERT (BERT4Rec) backbone; Adam, constant learning rate.

    Args:
        backbone: ``gpt2`` (causal, pre-LN) or ``bert`` (bidirectional, post-LN, masked items).
        checkpoint: a local directory (or hub name, online) of a backbone; overrides the size arguments.
        hidden_size, num_layers, num_heads, intermediate_size, dropout, activation: the backbone built from a
            config (``intermediate_size=None``: same as hidden, as SASRec's point-wise FFN).
        max_len: positions of the backbone; must equal ``--data.max_len`` (linked by the CLI).
        mask_prob: fraction of items masked for ``bert`` training.
        loss: ``bce`` (one sampled negative per position, SASRec), ``softmax`` or ``sampled_softmax``.
        num_negatives: negatives shared by a batch for ``sampled_softmax``.
        lr, betas, weight_decay: Adam (SASRec: 1e-3, (0.9, 0.98), 0).
        lr_schedule: ``constant`` (SASRec) or ``cosine`` (decay to 0 over the run's optimizer steps).
        ks: cut-offs of HR@k / NDCG@k.
        init: ``backbone`` (the backbone's own initialisation) or ``xavier`` (Xavier-normal backbone weights with
            >= 2 dimensions, as SASRec.pytorch; not with ``checkpoint``).
        num_items: set from the data by ``build``; given when loading a checkpoint.
        fused: fused Adam step (None: automatic, see ``recipes._shared.optim.use_fused_optimizer``).

    Example:
        >>> dm = SequentialRecommendationData(synthetic_users=50, synthetic_items=30, num_eval_negatives=10)
        >>> m = SequentialRecommender(hidden_size=16, num_layers=1); m.build(dm); m.model.num_items
        30
    """

    def __init__(
        self,
        backbone: str = "gpt2",
        checkpoint: str | None = None,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 1,
        intermediate_size: int | None = None,
        dropout: float = 0.2,
        activation: str = "relu",
        max_len: int = 20,
        mask_prob: float = 0.2,
        loss: str = "bce",
        num_negatives: int = 100,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.98),
        weight_decay: float = 0.0,
        lr_schedule: str = "constant",
        ks: list[int] = [10],  # noqa: B006 (jsonargparse needs a plain default)
        num_items: int | None = None,
        fused: bool | None = None,
        init: str = "backbone",
    ) -> None:
        super().__init__()
        if not (lr > 0):
            raise RecipeError(f"--model.lr={lr!r} must be > 0.")
        if backbone not in BACKBONES and checkpoint is None:
            raise RecipeError(f"--model.backbone={backbone!r} is not supported; choose one of {list(BACKBONES)} "
                              "or pass --model.checkpoint=<dir>.")
        if loss not in LOSSES:
            raise RecipeError(f"--model.loss={loss!r} is not supported; choose one of {list(LOSSES)}.")
        if not 0.0 <= dropout < 1.0:
            raise RecipeError(f"--model.dropout={dropout!r} must be in [0, 1).")
        if not 0.0 < mask_prob < 1.0:
            raise RecipeError(f"--model.mask_prob={mask_prob!r} must be in (0, 1).")
        if lr_schedule not in LR_SCHEDULES:
            raise RecipeError(f"--model.lr_schedule={lr_schedule!r} is not supported; choose one of {list(LR_SCHEDULES)}.")
        if init not in INITS:
            raise RecipeError(f"--model.init={init!r} is not supported; choose one of {list(INITS)}.")
        if init == "xavier" and checkpoint is not None:
            raise RecipeError(f"--model.init=xavier would overwrite the weights of --model.checkpoint={checkpoint!r}; "
                              "leave --model.init=backbone with a checkpoint.")
        if num_negatives < 1:
            raise RecipeError(f"--model.num_negatives={num_negatives!r} must be >= 1.")
        if not ks or any(int(k) < 1 for k in ks):
            raise RecipeError(f"--model.ks={ks!r} must be a non-empty list of integers >= 1.")
        if hidden_size % num_heads:
            raise RecipeError(f"--model.hidden_size={hidden_size} must be divisible by --model.num_heads={num_heads}.")
        self.save_hyperparameters()
        self.ks = tuple(int(k) for k in ks)
        self.fused = fused
        self.model: SeqRecModel | None = None  # built by build(datamodule), once the item count is known
        if num_items is not None:  # loading a checkpoint: build now so the state dict has somewhere to go
            self._build(num_items)

    def _build(self, num_items: int) -> None:
        h = self.hparams
        try:
            self.model = SeqRecModel(num_items, h.backbone, h.checkpoint, h.hidden_size, h.num_layers, h.num_heads,
                                     h.intermediate_size, h.dropout, h.max_len, h.activation, h.mask_prob,
                                     h.get("init", "backbone"))
        except ValueError as err:
            raise RecipeError(str(err)) from err
        self.hparams["num_items"] = num_items  # saved in checkpoints, so load_from_checkpoint rebuilds the model

    def build(self, datamodule: L.LightningDataModule) -> None:
        """Create the model for the data's item count (checks that ``max_len`` agrees with the data)."""
        if getattr(datamodule, "max_len", self.hparams.max_len) != self.hparams.max_len:
            raise RecipeError(f"--model.max_len={self.hparams.max_len} differs from --data.max_len="
                              f"{datamodule.max_len}; set them equal.")
        self._build(datamodule.num_items)

    def setup(self, stage: str) -> None:
        build_once(self)

    def configure_model(self) -> None:
        shard_for_strategy(self)  # under --trainer.strategy=fsdp2: fully_shard each backbone block

    # -- training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.model.loss(batch["seq"], batch["neg"], self.hparams.loss, self.hparams.num_negatives)
        log_step_metric(self, "train/loss", loss, prog_bar=True, batch_size=batch["seq"].shape[0])
        return loss

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas),
                               weight_decay=self.hparams.weight_decay, fused=use_fused_optimizer(self, self.fused))
        if self.hparams.get("lr_schedule", "constant") == "constant":
            return opt
        if not math.isfinite(self.trainer.estimated_stepping_batches):
            raise RecipeError("--model.lr_schedule=cosine needs a finite run: set --trainer.max_epochs or max_steps.")
        return with_warmup_cosine(self.trainer, opt, warmup_ratio=0.0)

    # -- evaluation
    @torch.no_grad()
    def evaluate(self, batch: dict) -> dict[str, torch.Tensor]:
        """Per-user metrics of both protocols: ``hr@k``/``ndcg@k`` (sampled) and ``full_hr@k``/``full_ndcg@k``."""
        scores = self.model.scores(batch["seq"]).float()  # [B, num_items + 1]; column 0 (padding) is -inf
        target = batch["target"]
        candidates = torch.cat([target[:, None], batch["negatives"]], dim=1)
        sampled_rank = target_rank(scores.gather(1, candidates), 0)
        valid = torch.ones_like(scores, dtype=torch.bool)
        valid[:, 0] = False
        valid[batch["seen_rows"], batch["seen_items"]] = False  # the user's history does not compete ...
        valid[torch.arange(len(target), device=target.device), target] = True  # ... but the target always does
        full_rank = target_rank(scores, target, valid)
        out = rank_metrics(sampled_rank, self.ks)
        out.update({f"full_{k}": v for k, v in rank_metrics(full_rank, self.ks).items()})
        return out

    def _eval_step(self, batch: dict, prefix: str) -> None:
        for name, values in self.evaluate(batch).items():
            self.log(f"{prefix}/{name}", values.mean(), batch_size=len(values), prog_bar=name == f"hr@{self.ks[0]}",
                     sync_dist=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    # -- export
    def export_model(self, path) -> Path:
        """Save the backbone (``save_pretrained``) and the item embeddings; reload with ``SeqRecModel.from_pretrained``."""
        return self.model.save_pretrained(path)


def cli(args: list[str] | None = None):
    """Run the recipe and return the ``RecipeCLI`` (its ``model``, ``datamodule``, ``trainer``, ``run_dir``)."""
    return run_recipe(SequentialRecommender, SequentialRecommendationData, "sequential_recommendation", args,
               links=[("data.max_len", "model.max_len")],
               default_max_epochs=10, trainer_defaults={"check_val_every_n_epoch": 5})


def main(args: list[str] | None = None) -> None:
    """``python recipes/sequential_recommendation.py fit [--config FILE] [overrides]`` (fit is the default)."""
    main_or_exit(cli, args)


if __name__ == "__main__":
    main()
