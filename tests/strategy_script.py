"""Run by tests/test_strategies.py: TickCallback in real Trainer fits under every way Lightning trains here
on CPU (gloo), each fit next to an independent fp64 reference.

    python strategy_script.py OUT MODE DEVICES BUILD N_LAYER CONFIGS

CONFIGS is a comma-separated list of ``PRECISION/ACCUMULATE[/compile|/opaque]``; each is one fit, written to
``OUT/<its index>/``, all inside the processes (and process group) of one launch, so a matrix of fits pays
the start-up of the processes once.

MODE ``single``: one process, Lightning's default strategy; ``compile`` wraps the model in ``torch.compile``;
MODE ``ddp``: Lightning's ``ddp`` over DEVICES ranks;
MODE ``fsdp2``: ``ModelParallelStrategy``, ``fully_shard`` per GPT-2 block and on the root (data parallel);
MODE ``nan``: the same, ``ticks="nonfinite"``, ``ranks="all"``, and at step 2 only rank 1's loss is NaN
(a constant added after the graph, so the gradients stay finite and no other rank sees anything);
MODE ``tp``: 2-way tensor parallel (``parallelize_module``: column-wise then row-wise Linear) on a small
MLP classifier;
MODE ``fsdp2_tp``: 2-D, the same tensor parallel over pairs of ranks, then ``fully_shard`` of the MLP over
the data-parallel dimension (DEVICES // 2 ranks).

The models are GPT-2 (single, ddp, fsdp2, nan) and the MLP (tp, fsdp2_tp). BUILD ``init`` builds the model
in ``__init__``, ``configure`` inside ``configure_model``.

A config flagged ``opaque`` (fsdp2) fits the MLP, ``fully_shard``-ed whole, whose forward returns an object
FSDP2 cannot traverse: the optimizer's sharded parameters then never get gradients.

An independent ``Reference`` callback writes, per rank, fp64 statistics of ``full_tensor()`` weights and
gradients before each update and of the applied update, the gradient norm as ``clip_grad_norm_`` computes
it, and the norm layers' inputs (from forward pre-hooks; under compile, from an unpatched, uncompiled twin
loaded with the same weights, run on the same batch); collectives issued inside TickCallback's hooks are counted per tick.
"""

import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning as L  # noqa: E402
import tiny  # noqa: E402
import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from torch import nn  # noqa: E402
from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: E402

from recipes._shared.sharding import end_process_group  # noqa: E402
from tick_lightning import TickCallback  # noqa: E402

TICKS = (0, 2, 3)


def full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().double()


def stats(t):
    x = t.reshape(-1)
    return {"norm": float(x.norm()), "mean": float(x.mean()), "std": float(x.std(correction=0)),
            "absmax": float(x.abs().max()), "nonfinite": float((~torch.isfinite(x)).sum())}


class MLP(nn.Module):
    def __init__(self, opaque=False):
        super().__init__()
        self.opaque = opaque
        torch.manual_seed(0)
        self.embed = nn.Embedding(tiny.VOCAB, 32)
        self.norm = nn.LayerNorm(32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.head = nn.Linear(32, 2)

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(self.embed(input_ids)))))
        logits = self.head(h.mean(1))
        loss = nn.functional.cross_entropy(logits, labels)
        if self.opaque:  # FSDP2 cannot see the tensors in it: no post-backward reshard, the optimizer gets no grads
            return type("Out", (), {"loss": loss})
        # a pytree-visible output: FSDP2 finds the tensors to hook its post-backward reshard through it
        return SequenceClassifierOutput(loss=loss, logits=logits)


class Module(tiny.HFClassifier):
    def __init__(self, mode, build, n_layer, compiled=False, opaque=False):
        self.mode, self.build, self.n_layer, self.compiled, self.opaque = mode, build, n_layer, compiled, opaque
        super().__init__(self._make() if build == "init" else None)

    def _make(self):
        if self.opaque or self.mode in ("tp", "fsdp2_tp"):
            return MLP(self.opaque)
        return tiny.tiny_gpt2(n_layer=self.n_layer)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.mode == "nan" and self.trainer.global_step == 2 and self.trainer.global_rank == 1:
            loss = loss + torch.tensor(float("nan"))  # the loss is NaN, its gradients are not
        return loss

    def configure_model(self):
        if self.model is None:
            self.model = self._make()
        if self.compiled:  # aot_eager: dynamo tracing and functionalized mutation as inductor sees them, no C++ build
            self.model = torch.compile(self.model, backend="aot_eager")
        if self.mode in ("single", "ddp"):
            return
        from torch.distributed.fsdp import fully_shard

        if self.mode in ("tp", "fsdp2_tp"):
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            parallelize_module(self.model, self.device_mesh["tensor_parallel"],
                               {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
            if self.mode == "fsdp2_tp":
                fully_shard(self.model, mesh=self.device_mesh["data_parallel"])
        elif self.opaque:
            fully_shard(self.model, mesh=self.device_mesh["data_parallel"])
        else:
            mesh = self.device_mesh["data_parallel"]
            for block in self.model.transformer.h:
                fully_shard(block, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def clean(name):
    return name.replace("_orig_mod.", "")  # torch.compile's wrapper: names as the user's model has them


class Reference(Callback):
    def __init__(self, out, mode, n_layer):
        self.out, self.mode, self.rows, self.hooks = out, mode, {}, []
        # under compile, norm inputs come from an unpatched, uncompiled twin loaded with the same weights:
        # the compiled graph does not run hooks added after tracing, and the patched norms feed TickCallback
        self.twin = tiny.tiny_gpt2(n_layer=n_layer) if mode == "single" else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = step = trainer.global_step
        row = self.rows.setdefault(step, {"loss": 0.0, "norm_input": {}})
        if step not in TICKS:
            return
        compiled = hasattr(pl_module.model, "_orig_mod")
        observed = self.twin if compiled else pl_module.model
        if compiled:
            self.twin.load_state_dict({clean(k): v for k, v in pl_module.model.state_dict().items()})
        for name, m in observed.named_modules():
            if isinstance(m, nn.LayerNorm):
                self.hooks.append(m.register_forward_pre_hook(self._hook(row["norm_input"], f"model.{name}")))
        if compiled:
            ids, mask, labels = batch
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                self.twin(input_ids=ids, attention_mask=mask, labels=labels)

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
        params = [(clean(n), p) for n, p in pl_module.named_parameters()]
        row = self.rows[step]
        row["weight"] = {n: stats(full(p)) for n, p in params}
        row["grad"] = {n: stats(full(p.grad)) for n, p in params if p.grad is not None}
        row["before"] = {n: full(p).clone() for n, p in params}
        grads = [p.grad for _, p in params if p.grad is not None]
        if not grads:
            return
        row["gnorm_fp64"] = float(torch.cat([full(g).reshape(-1) for g in grads]).norm())
        if self.mode not in ("tp", "fsdp2_tp"):  # plain or one-mesh gradients (max_norm=inf changes nothing)
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
                n = clean(n)
                u = full(p) - row["before"][n]
                row["update"][n] = {"norm": float(u.norm()), "ratio": float(u.norm() / row["before"][n].norm())}
            del row["before"]

    def on_train_end(self, trainer, pl_module):
        for row in self.rows.values():
            row.pop("before", None)
        Path(self.out, f"reference-rank{trainer.global_rank}.json").write_text(json.dumps(self.rows))


COUNTS: dict = {}  # tick step -> collectives issued inside the current fit's TickCallback hooks
_INSIDE: list = []


def count_collectives():
    """Count collectives issued inside TickCallback's hooks (not Lightning's or FSDP's own), per tick step."""
    for fn in ("all_gather", "all_reduce", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor"):
        original = getattr(tdist, fn)

        def counted(*a, _original=original, **k):
            if _INSIDE:
                COUNTS[str(_INSIDE[-1])] = COUNTS.get(str(_INSIDE[-1]), 0) + 1
            return _original(*a, **k)
        setattr(tdist, fn, counted)


def watch_hooks(cb):
    for hook in ("on_before_optimizer_step", "on_train_batch_end"):
        original = getattr(cb, hook)

        def wrapped(trainer, *a, _original=original, **k):
            _INSIDE.append(trainer.global_step if cb._tick is None else cb._tick.step)
            try:
                return _original(trainer, *a, **k)
            finally:
                _INSIDE.pop()
        setattr(cb, hook, wrapped)


def strategy_for(mode, devices):
    if mode == "single":
        return "auto"
    if mode == "ddp":
        return "ddp"
    tp = {"tp": devices, "fsdp2_tp": 2}.get(mode, 1)
    return ModelParallelStrategy(data_parallel_size=devices // tp, tensor_parallel_size=tp)


def fit(out, mode, devices, build, n_layer, precision, accumulate, compiled, opaque):
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0)
    if mode == "nan":
        cb = TickCallback(ticks="nonfinite", ranks="all", dirpath=f"{out}/ticks")
    else:
        cb = TickCallback(ticks=",".join(map(str, TICKS)), dirpath=f"{out}/ticks", patch_norms=(mode != "tp"))
    COUNTS.clear()
    watch_hooks(cb)
    copies = []
    update = next(c for c in cb._collectors if type(c).__name__ == "UpdateCollector")
    real_copy = update._copy
    update._copy = lambda name, view: copies.append([name, view.numel()]) or real_copy(name, view)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy_for(mode, devices), max_steps=4,
                        logger=False, precision=precision, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accumulate_grad_batches=accumulate,
                        callbacks=[Reference(out, mode, n_layer), cb])  # the reference first: before TickCallback arms
    model = Module(mode, build, n_layer, compiled, opaque)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, tiny.loader(tiny.token_dataset(64), 4))
    named = [(clean(n), p) for n, p in model.named_parameters()]
    info = {"collectives": dict(COUNTS),
            "warnings": [str(w.message) for w in caught if str(w.message).startswith("TickCallback")],
            "patched": len(cb.norm_patch_report.patched) if cb.norm_patch_report is not None else 0,
            "sharded": [n for n, p in named if type(p.data).__name__ == "DTensor"],
            "compiled": hasattr(model.model, "_orig_mod"),
            "mesh_dims": {n: p.device_mesh.ndim for n, p in named if hasattr(p, "device_mesh")},
            "update_copies": copies, "full_numel": {n: p.numel() for n, p in named},
            "local_numel": {n: dist_local(p).numel() for n, p in named}}
    Path(out, f"info-rank{trainer.global_rank}.json").write_text(json.dumps(info))


def dist_local(p):
    return p.to_local() if hasattr(p, "to_local") else p


def main(out, mode, devices, build, n_layer, configs):
    count_collectives()
    for i, config in enumerate(configs.split(",")):
        precision, accumulate, *flags = config.split("/")
        fit(Path(out, str(i)), mode, devices, build, n_layer, precision, int(accumulate), "compile" in flags,
            "opaque" in flags)


if __name__ == "__main__":
    o, m, d, b, n, c = sys.argv[1:7]
    main(o, m, int(d), b, int(n), c)
    end_process_group()  # as torch asks at the end of a distributed script (pytorch/pytorch#190489)
