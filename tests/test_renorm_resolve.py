"""Renorm under large-model training: plans resolved against the live parameters once the strategy has set
the model up (single process and FSDP2), flattened FSDP1 views refused, stacked temporaries capped."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import tiny
import torch
from instruments import LiveBytes
from torch import nn

from tick_lightning import Renorm, RenormCallback, TickCallback
from tick_lightning.renorm import RenormEngine, RenormError, RenormPlan, renorm_
from tick_lightning.renorm.ops import FlattenedViewError

HERE = Path(__file__).parent
ATTN = "model.bert.encoder.layer.*.attention.self.*.weight"
FFN = "model.bert.encoder.layer.*.intermediate.dense.weight"


class BuiltLate(tiny.HFClassifier):
    """The model exists only from configure_model on (as large models are built), and its parameters are
    swapped for new objects there, as a sharding strategy does."""

    def __init__(self):
        super().__init__(nn.Identity())

    def configure_model(self):
        if isinstance(self.model, nn.Identity):
            self.model = tiny.tiny_bert()
            for module in self.model.modules():
                for name, p in list(module.named_parameters(recurse=False)):
                    setattr(module, name, nn.Parameter(p.detach().clone()))


class CheckLive(L.Callback):
    def __init__(self, engine):
        self.engine, self.seen = engine, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.seen is None:
            live = dict(pl_module.named_parameters())
            self.seen = [(n, live.get(n) is t) for n, t in self.engine.planned()]


def fit(tmp_path, module, callbacks, **kw):
    trainer = tiny.trainer(tmp_path, callbacks=callbacks, **kw)
    trainer.fit(module, tiny.loader(tiny.token_dataset(32)))
    return trainer


def test_renorm_callback_plans_the_live_parameters_of_a_model_built_in_configure_model(tmp_path):
    cb = RenormCallback([Renorm(ATTN, method="unit", at="step")], ticks="every:2", dirpath=tmp_path / "ticks")
    check = CheckLive(cb.engine)
    module = BuiltLate()
    fit(tmp_path, module, [cb, check], max_steps=2)
    assert len(check.seen) == 6 and all(live for _, live in check.seen), check.seen
    for name, p in module.named_parameters():
        if ".attention.self." in name and name.endswith(".weight"):
            torch.testing.assert_close(p.norm(dim=-1), torch.ones(p.shape[0]))


def test_tick_callback_plans_the_live_parameters_of_a_model_built_in_configure_model(tmp_path):
    """Needs TickCallback to call ``engine.resolve(pl_module, total_steps)`` in ``on_fit_start``."""
    cb = TickCallback(ticks="every:2", states=["loss"], renorm=[Renorm(ATTN, method="unit", at="step")],
                      dirpath=tmp_path / "ticks", log_to_loggers=False)
    check = CheckLive(cb._renorm)
    fit(tmp_path, BuiltLate(), [cb, check], max_steps=2)
    assert len(check.seen) == 6 and all(live for _, live in check.seen), check.seen


MODES = ("renorm_callback", "tick_callback")


@pytest.fixture(scope="module")
def fsdp2_fits(tmp_path_factory):
    """Both callbacks' FSDP2 fits, one after the other in one launch of two processes (shared by the tests)."""
    out = tmp_path_factory.mktemp("renorm_fsdp2")
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(HERE / "renorm_fsdp2_script.py"), str(out), ",".join(MODES)], env=env,
                          capture_output=True, text=True, timeout=240)  # a hang fails here instead of blocking CI
    return proc, out


@pytest.mark.parametrize("mode", MODES)
def test_fsdp2_plans_are_the_live_sharded_parameters(fsdp2_fits, mode):
    proc, out = fsdp2_fits
    out = out / mode
    planned = [json.loads((out / f"planned-rank{r}.json").read_text())
               for r in (0, 1) if (out / f"planned-rank{r}.json").exists()]
    assert len(planned) == 2, proc.stderr[-3000:]
    for rank in planned:
        assert rank["planned"] == [f"model.transformer.h.{i}.attn.c_attn.weight" for i in range(2)]
        assert rank["live"] and rank["sharded"], rank  # fully_shard's new nn.Parameter(DTensor) objects
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in (0, 1):
        result = json.loads((out / f"rank{r}.json").read_text())
        assert result["applications"] == [3]
        for norms in result["row_norms"].values():  # the live weights were edited: unit rows
            assert norms == pytest.approx([1.0] * len(norms), abs=1e-5)


# --------------------------------------------------------------------------------------- FSDP1 views
class Flatten(L.Callback):
    """Placed before the renorm callback: after the first optimizer step (plans resolved at fit start), replace
    targeted data by a 1-D flat-shard view, as FSDP1 (use_orig_params=True) leaves parameters between steps,
    or by an empty shard (a rank that holds none of it)."""

    def __init__(self, name, empty=False):
        self.name, self.empty, self.before = name, empty, None

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        p = dict(pl_module.named_parameters())[self.name]
        flat = p.data.reshape(-1)
        p.data = flat[:0] if self.empty else flat[: flat.numel() // 2]


@pytest.mark.parametrize("empty", [False, True])
def test_flattened_view_is_refused_before_it_is_edited(tmp_path, empty):
    name = "model.bert.encoder.layer.0.attention.self.query.weight"
    cb = RenormCallback([Renorm(ATTN, method="layernorm", at="step")], ticks="every:2", dirpath=tmp_path / "ticks")
    module = tiny.HFClassifier(tiny.tiny_bert())
    flatten = Flatten(name, empty)
    with pytest.raises(FlattenedViewError, match=rf"parameter '{name}' has shape \[{0 if empty else 512}\] but was "
                                                 r"planned for \[32, 32\].*FSDP1"):
        fit(tmp_path, module, [flatten, cb], max_steps=2)
    # refused before anything was written: no other weight was re-normalized either
    others = {n: p for n, p in module.named_parameters() if ".attention.self." in n and n != name}
    assert len(others) == 11 and all(torch.equal(p, flatten.before[n]) for n, p in others.items())


def test_fsdp1_flattened_parameters_are_refused_at_fit_start():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    model[0].weight._fsdp_flattened = True  # what FSDP1 marks its original parameters with
    engine = RenormEngine([Renorm("*.weight", method="unit", at="step")])
    with pytest.raises(RenormError, match=r"'0.weight', a flattened FSDP1 parameter.*FSDP2"):
        engine.resolve(model)


# ------------------------------------------------------------------------------------ batch size cap
def test_stacked_batches_are_capped_and_give_the_same_result():
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(64, 64, generator=g) for _ in range(8)]  # 16 KiB each in fp32
    one = 64 * 64 * 4
    uncapped = [w.clone() for w in weights]
    capped = [w.clone() for w in weights]
    with LiveBytes() as big:
        full_stats = renorm_(uncapped, "layernorm", batch=True, stats=True)
    plan = RenormPlan(capped, batch=True, max_batch_bytes=2 * one)
    assert [len(grp.indices) for grp in plan.groups] == [2, 2, 2, 2]
    with LiveBytes() as small:
        small_stats = plan.run("layernorm", stats=True)
    cap = 2 * one
    assert big.peak >= 4 * len(weights) * one  # the whole group stacked: input, centred, result, stats temporaries
    assert small.peak <= 4 * cap + 4096  # the same four, of one capped batch (+ the statistics rows)
    for a, b in zip(uncapped, capped):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(full_stats, small_stats, rtol=0, atol=1e-6)


def test_a_tensor_larger_than_the_cap_is_its_own_batch_and_the_cap_is_validated():
    plan = RenormPlan([torch.randn(8, 8) for _ in range(3)], batch=True, max_batch_bytes=16)
    assert [grp.indices for grp in plan.groups] == [[0], [1], [2]]
    with pytest.raises(ValueError, match="max_batch_bytes=0 must be a positive number of bytes"):
        RenormPlan([torch.randn(2, 2)], max_batch_bytes=0)
    with pytest.raises(RenormError, match="max_batch_bytes=-1"):
        RenormEngine([Renorm("*", method="unit")], max_batch_bytes=-1)


def test_check_selection_raises_what_fit_start_would_and_changes_nothing():
    """``TickCallback.check_selection``: the selectors' and Renorm targets' errors of fit start, before it, with no
    side effect on the model or the callback (the recipes call it on the model they built)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    good = TickCallback(ticks="every:1", select="linear", activations="0", renorm=[Renorm(target=("linear", "!*.bias"), method="unit")])
    good.check_selection(model)
    assert not good._resolved and good._params.selected == [] and not good._renorm._ready
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert [type(m) for m in model] == [nn.Linear, nn.LayerNorm, nn.Linear]  # nothing patched
    twice = [Renorm(target=("linear", "!*.bias"), method="unit"), Renorm(target="2.weight", method="unit")]
    for callback, error, match in [
        (TickCallback(select="encoder.*"), ValueError, "Parameter selector 'encoder.*' matches nothing"),
        (TickCallback(norm_select="3"), ValueError, "Normalization layer selector '3' matches nothing"),
        (TickCallback(renorm=twice), RenormError, r"Renorm #1 \(target='2.weight'\) and Renorm #0 both "
                                                  "target parameter '2.weight'"),
    ]:
        with pytest.raises(error, match=match):
            callback.check_selection(model)
