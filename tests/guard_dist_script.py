"""The guard on 2 CPU processes (gloo), under DDP or FSDP2. Run by tests/test_guard.py:

    python tests/guard_dist_script.py OUT_DIR ddp|fsdp2|tp

Every rank records (``ranks="all"``) into ``OUT_DIR/ticks``; each writes ``OUT_DIR/rank<R>.json`` with what it
saw, for the test to compare with independent references.

``ddp``: ``Guard("skip")`` on a tiny BERT. At step ``LOSS_STEP`` rank 1's loss is x``LOSS_FACTOR`` (its batch
alone): a spike before DDP's all-reduce, so every rank's averaged gradient carries it, and the loss the guard judges
is the mean over the ranks (rank 0's own loss is normal). At step ``NAN_STEP`` rank 1's loss is NaN. Both ranks must
skip both steps and stay replicas: the parameters are written per step and compared.

``fsdp2``: ``Guard("clip")`` on a tiny GPT-2, ``fully_shard`` per block and the root. At step ``CLIP_STEP`` the
gradient of ``SHARDED`` (sharded over both ranks) is x``CLIP_FACTOR`` on every rank's shard: each rank holds half of
it, and the tensor's norm is the all-reduced one. Each rank writes that parameter's ``full_tensor()`` gradient
norm at every step (the reference the guard's recorded norm must equal).

``tp``: the same with 2-way tensor parallelism (``parallelize_module``: ``fc1`` column-wise, ``fc2`` row-wise) on
the small MLP of tests/strategy_script.py; the planted tensor is ``fc1.weight``.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

from recipes._shared.sharding import end_process_group  # noqa: E402
from tick_lightning import Guard, TickCallback  # noqa: E402

LOSS_STEP, LOSS_FACTOR, NAN_STEP = 16, 1e3, 22
SHARDED, CLIP_STEP, CLIP_FACTOR = "model.transformer.h.0.mlp.c_fc.weight", 14, 50.0
TP_SHARDED = "model.fc1.weight"


class TensorParallel(tiny.HFClassifier):
    def configure_model(self):
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        parallelize_module(self.model, self.device_mesh["tensor_parallel"],
                           {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})


class RankLoss(tiny.HFClassifier):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.trainer.global_rank == 1 and self.trainer.global_step == LOSS_STEP:
            return loss * LOSS_FACTOR
        if self.trainer.global_rank == 1 and self.trainer.global_step == NAN_STEP:
            return loss * float("nan")
        return loss


class Watch(L.Callback):
    """Per step: the parameters' checksum (DDP replicas must agree) and, under FSDP2, the full gradient norm of
    ``SHARDED`` before the guard (this callback runs before TickCallback's hook)."""

    def __init__(self, out: Path, sharded: str | None):
        self.out, self.sharded, self.rows = out, sharded, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.sharded:
            grad = dict(pl_module.named_parameters())[self.sharded].grad
            if trainer.global_step == CLIP_STEP:
                grad.mul_(CLIP_FACTOR)
            self.rows.setdefault(trainer.global_step, {})["full_norm"] = float(grad.full_tensor().double().norm())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.sharded:
            total = sum(float(p.detach().double().sum()) for p in pl_module.parameters())
            self.rows.setdefault(trainer.global_step - 1, {})["param_sum"] = total

    def on_train_end(self, trainer, pl_module):
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.rows))


def main(out: str, kind: str) -> None:
    out = Path(out)
    sharded = None
    if kind == "ddp":
        guard, model, strategy = Guard("skip", warmup=8), RankLoss(tiny.tiny_bert()), "ddp"
    else:
        from lightning.pytorch.strategies import ModelParallelStrategy

        guard = Guard("clip", warmup=8, z=3.0)
        if kind == "fsdp2":
            model, sharded = tiny.ShardedGPT2Classifier(tiny.tiny_gpt2()), SHARDED
            strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        else:
            from strategy_script import MLP

            model, sharded = TensorParallel(MLP()), TP_SHARDED
            strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    ticks = TickCallback(ticks="every:10", states=["loss", "grad"], ranks="all", dirpath=out / "ticks",
                         log_to_loggers=False, guard=guard)
    trainer = tiny.trainer(out, strategy=strategy, devices=2, callbacks=[Watch(out, sharded), ticks],
                           max_steps=28)
    data = tiny.token_dataset(28 * 2 * 4)
    data.tensors = (*data.tensors[:2], torch.randint(0, 2, (len(data),), generator=torch.Generator().manual_seed(1)))
    trainer.fit(model, tiny.loader(data, batch_size=4))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    end_process_group()  # as torch asks at the end of a distributed script (pytorch/pytorch#190489)
