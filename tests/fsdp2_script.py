"""Run by tests/test_fsdp2.py: TickCallback under Lightning's ModelParallelStrategy on CPU (gloo).

    python fsdp2_script.py OUT MODE DEVICES BUILD N_LAYER ACCUMULATE [PRECISION]

MODE ``fsdp2``: ``fully_shard`` per GPT-2 block and on the root (data parallel over DEVICES ranks);
MODE ``nan``: the same, ``ticks="nonfinite"``, ``ranks="all"``, and at step 2 only rank 1's loss is NaN
(a constant added after the graph, so the gradients stay finite and no other rank sees anything);
MODE ``tp``: 2-way tensor parallel (``parallelize_module``: column-wise then row-wise Linear) on a small
MLP classifier. BUILD ``init`` builds the model in ``__init__``,
``configure`` inside ``configure_model``. PRECISION is the Trainer's (default ``32-true``).

An independent ``Reference`` callback writes, per rank, fp64 statistics of ``full_tensor()`` weights and
gradients before each update and of the applied update, the gradient norm as ``clip_grad_norm_`` computes
it, and the norm layers' inputs; collectives issued inside TickCallback's hooks are counted per tick.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning as L  # noqa: E402
import tiny  # noqa: E402
import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from torch import nn  # noqa: E402

from tick_lightning import TickCallback  # noqa: E402

TICKS = (0, 2, 3)


def full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().double()


def stats(t):
    x = t.reshape(-1)
    return {"norm": float(x.norm()), "mean": float(x.mean()), "std": float(x.std(correction=0)),
            "absmax": float(x.abs().max()), "nonfinite": float((~torch.isfinite(x)).sum())}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(tiny.VOCAB, 32)
        self.norm = nn.LayerNorm(32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.head = nn.Linear(32, 2)

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(self.embed(input_ids)))))
        logits = self.head(h.mean(1))
        return type("Out", (), {"loss": nn.functional.cross_entropy(logits, labels)})


class Module(tiny.HFClassifier):
    def __init__(self, mode, build, n_layer):
        self.mode, self.build, self.n_layer = mode, build, n_layer
        super().__init__(self._make() if build == "init" else None)

    def _make(self):
        return MLP() if self.mode == "tp" else tiny.tiny_gpt2(n_layer=self.n_layer)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.mode == "nan" and self.trainer.global_step == 2 and self.trainer.global_rank == 1:
            loss = loss + torch.tensor(float("nan"))  # the loss is NaN, its gradients are not
        return loss

    def configure_model(self):
        if self.model is None:
            self.model = self._make()
        from torch.distributed.fsdp import fully_shard

        if self.mode == "tp":
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            parallelize_module(self.model, self.device_mesh["tensor_parallel"],
                               {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
        else:
            mesh = self.device_mesh["data_parallel"]
            for block in self.model.transformer.h:
                fully_shard(block, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class Reference(Callback):
    def __init__(self, out):
        self.out, self.rows, self.hooks = out, {}, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = step = trainer.global_step
        row = self.rows.setdefault(step, {"loss": 0.0, "norm_input": {}})
        if step in TICKS:
            for name, m in pl_module.named_modules():
                if isinstance(m, nn.LayerNorm):
                    self.hooks.append(m.register_forward_pre_hook(self._hook(row["norm_input"], name)))

    def _hook(self, store, name):
        def hook(module, args):
            x = args[0].detach().double()
            s = store.setdefault(name, [0.0, 0.0, 0.0, 0])
            s[0] += float(x.sum())
            s[1] += float(x.square().sum())
            s[2] = max(s[2], float(x.abs().max()))
            s[3] += x.numel()
        return hook

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step
        params = [(n, p) for n, p in pl_module.named_parameters()]
        row = self.rows[step]
        row["weight"] = {n: stats(full(p)) for n, p in params}
        row["grad"] = {n: stats(full(p.grad)) for n, p in params if p.grad is not None}
        row["before"] = {n: full(p).clone() for n, p in params}
        grads = [p.grad for _, p in params if p.grad is not None]
        row["gnorm_fp64"] = float(torch.cat([full(g).reshape(-1) for g in grads]).norm())
        if self.out_mode != "tp":  # every gradient a DTensor: clip_grad_norm_ (max_norm=inf changes nothing)
            total = torch.nn.utils.clip_grad_norm_([p for _, p in params], max_norm=float("inf"))
            row["clip_grad_norm"] = float(full(total))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for h in self.hooks:
            h.remove()
        self.hooks = []
        row = self.rows[self.step]
        row["loss"] += float(outputs["loss"])
        if trainer.global_step > self.step:  # the optimizer stepped: what it changed
            row["update"] = {}
            for n, p in pl_module.named_parameters():
                u = full(p) - row["before"][n]
                row["update"][n] = {"norm": float(u.norm()), "ratio": float(u.norm() / row["before"][n].norm())}
            del row["before"]

    def on_train_end(self, trainer, pl_module):
        for row in self.rows.values():
            row.pop("before", None)
        Path(self.out, f"reference-rank{trainer.global_rank}.json").write_text(json.dumps(self.rows))


def count_collectives(cb, counts):
    """Collectives issued inside TickCallback's hooks, per tick step (not Lightning's or FSDP's own)."""
    inside = []
    for fn in ("all_gather", "all_reduce", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor"):
        original = getattr(tdist, fn)

        def counted(*a, _original=original, **k):
            if inside:
                counts[str(inside[-1])] = counts.get(str(inside[-1]), 0) + 1
            return _original(*a, **k)
        setattr(tdist, fn, counted)
    for hook in ("on_before_optimizer_step", "on_train_batch_end"):
        original = getattr(cb, hook)

        def wrapped(trainer, *a, _original=original, **k):
            inside.append(trainer.global_step if cb._tick is None else cb._tick.step)
            try:
                return _original(trainer, *a, **k)
            finally:
                inside.pop()
        setattr(cb, hook, wrapped)


def main(out, mode, devices, build, n_layer, accumulate, precision="32-true"):
    L.seed_everything(0)
    if mode == "nan":
        cb = TickCallback(ticks="nonfinite", ranks="all", dirpath=f"{out}/ticks")
    else:
        cb = TickCallback(ticks=",".join(map(str, TICKS)), dirpath=f"{out}/ticks", patch_norms=(mode == "fsdp2"))
    counts, copies = {}, []
    count_collectives(cb, counts)
    update = next(c for c in cb._collectors if type(c).__name__ == "UpdateCollector")
    real_copy = update._copy
    update._copy = lambda name, view: copies.append([name, view.numel()]) or real_copy(name, view)
    ref = Reference(out)
    ref.out_mode = mode
    tp = devices if mode == "tp" else 1
    strategy = ModelParallelStrategy(data_parallel_size=devices // tp, tensor_parallel_size=tp)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=4, logger=False,
                        precision=precision,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accumulate_grad_batches=accumulate, callbacks=[ref, cb])
    model = Module(mode, build, n_layer)
    trainer.fit(model, tiny.loader(tiny.token_dataset(64), 4))
    info = {"collectives": counts,
            "patched": len(cb.norm_patch_report.patched) if cb.norm_patch_report is not None else 0,
            "sharded": [n for n, p in model.named_parameters() if type(p.data).__name__ == "DTensor"],
            "update_copies": copies, "full_numel": {n: p.numel() for n, p in model.named_parameters()},
            "local_numel": {n: dist_local(p).numel() for n, p in model.named_parameters()}}
    Path(out, f"info-rank{trainer.global_rank}.json").write_text(json.dumps(info))


def dist_local(p):
    return p.to_local() if hasattr(p, "to_local") else p


if __name__ == "__main__":
    o, m, d, b, n, a = sys.argv[1:7]
    main(o, m, int(d), b, int(n), int(a), *sys.argv[7:8])
