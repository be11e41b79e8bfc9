"""RenormCallback / RenormEngine in a real Trainer: what changes, what must not, records, AMP skips, resume,
bad input, and the function-preserving fold mode."""

import lightning as L
import pytest
import tiny
import torch
from lightning.pytorch.plugins import MixedPrecision
from test_renorm_ops import reference

from tick_lightning import Renorm, RenormCallback
from tick_lightning.renorm import RenormEngine, RenormError
from tick_lightning.schedule import TickSchedule
from tick_lightning.store import load_ticks, read_manifest


class Before(L.Callback):
    """Placed before RenormCallback: snapshots parameters and optimizer state after the optimizer step."""

    def __init__(self):
        self.params, self.opt = {}, {}

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        state = trainer.optimizers[0].state
        self.opt = {k: v.clone() for s in state.values() for k, v in s.items() if torch.is_tensor(v) for k in [id(v)]}


class After(L.Callback):
    """Placed after RenormCallback: calls ``check(step, before, after, pl_module)`` for every optimizer step."""

    def __init__(self, before, check):
        self.before, self.check, self.steps = before, check, []

    def on_train_batch_end(self, trainer, pl_module, *args):
        step = trainer.global_step - 1
        self.steps.append(step)
        after = {n: p.detach() for n, p in pl_module.named_parameters()}
        self.check(step, self.before.params, after, pl_module)
        state = trainer.optimizers[0].state
        for s in state.values():  # Adam moments are untouched by the projection (as in nGPT)
            for v in s.values():
                if torch.is_tensor(v):
                    assert torch.equal(v, self.before.opt[id(v)])


def fit(tmp_path, module, callbacks, **kw):
    trainer = tiny.trainer(tmp_path, callbacks=callbacks, **kw)
    trainer.fit(module, tiny.loader(tiny.token_dataset(32)))
    return trainer


ATTN = "model.bert.encoder.layer.*.attention.self.*.weight"
FFN = "model.bert.encoder.layer.*.intermediate.dense.weight"


def test_applies_exactly_to_targets_and_records(tmp_path):
    specs = [Renorm(ATTN, method="unit", at="step"), Renorm(FFN, method="layernorm", keep_norm=True, at="every:3")]
    cb = RenormCallback(specs, ticks="every:2", dirpath=tmp_path / "ticks")
    attn = {f"model.bert.encoder.layer.{i}.attention.self.{k}.weight" for i in range(2) for k in ("query", "key", "value")}
    ffn = {f"model.bert.encoder.layer.{i}.intermediate.dense.weight" for i in range(2)}

    def check(step, before, after, _):
        changed = attn | (ffn if step % 3 == 0 else set())
        for name, value in after.items():
            if name not in changed:
                assert torch.equal(value, before[name]), name  # bit-identical
        for name in attn:
            torch.testing.assert_close(after[name].double(), reference(before[name], "unit", -1, False, 1e-5))
        for name in changed - attn:
            torch.testing.assert_close(after[name].double(), reference(before[name], "layernorm", -1, True, 1e-5))

    before = Before()
    after = After(before, check)
    trainer = fit(tmp_path, tiny.HFClassifier(tiny.tiny_bert()), [before, cb, after], max_steps=6)
    assert after.steps == list(range(6)) and trainer.global_step == 6

    df = load_ticks(tmp_path / "ticks")
    assert set(df.state) == {"renorm"}
    steps_by_name = df.groupby("name").step.apply(lambda s: sorted(set(s)))
    for name in attn:
        assert steps_by_name[name] == [0, 2, 4]  # at="step": recorded on the callback's ticks only
    for name in ffn:
        assert steps_by_name[name] == [0, 3]  # own schedule: recorded at every application
    unit = df[(df.name.isin(attn)) & (df.stat == "norm_after")]
    assert ((unit.value - 32 ** 0.5).abs() < 1e-4).all()  # 32 unit rows -> Frobenius norm sqrt(32)
    ffn_rows = df[df.name.isin(ffn)].pivot_table(index=["step", "name"], columns="stat", values="value")
    assert (ffn_rows.norm_after - ffn_rows.norm_before).abs().max() < 1e-4  # keep_norm
    assert ffn_rows.mean_after.abs().max() < 1e-6
    manifest = read_manifest(tmp_path / "ticks")
    assert manifest["renorm"][0]["method"] == "unit" and manifest["attempts"][0]["start_step"] == 0


class InfAtStep1(tiny.HFClassifier):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if self.global_step == 1 else loss


def test_fp16_skipped_step_is_untouched(tmp_path):
    cb = RenormCallback([Renorm(["model.bert.encoder.*.weight", "!norm"], method="center", at="step")], ticks="every:1",
                        dirpath=tmp_path / "ticks")
    targets = []

    def check(step, before, after, pl_module):
        changed = [n for n in after if not torch.equal(after[n], before[n])]
        if step == 1:  # the scaler found inf and skipped optimizer.step(): the projection must not run
            assert changed == []
        else:
            assert changed and all(n.startswith("model.bert.encoder.") for n in changed)
            targets.append(step)

    before = Before()
    after = After(before, check)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    fit(tmp_path, InfAtStep1(tiny.tiny_bert()), [before, cb, after], max_steps=3, plugins=[plugin])
    assert targets == [0, 2]
    df = load_ticks(tmp_path / "ticks")
    at1 = df[(df.step == 1)].pivot_table(index="name", columns="stat", values="value")
    assert len(at1) and (at1.mean_before == at1.mean_after).all() and (at1.norm_before == at1.norm_after).all()


def test_forced_found_inf_masks_on_device():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
    engine = RenormEngine([Renorm("*.weight", method="layernorm", at="step")])
    engine.resolve(model)
    saved = [p.detach().clone() for p in model.parameters()]
    [block] = engine.apply(0, True, found_inf=torch.tensor([2.0]), record=True)
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), saved))
    assert block.state == "renorm" and block.names == ("0.weight", "1.weight") and block.values.shape == (2, 6)
    engine.apply(1, False, found_inf=torch.tensor([0.0]), record=False)
    assert not torch.equal(model[0].weight, saved[0]) and torch.equal(model[0].bias, saved[1])


def test_gradient_accumulation_applies_once_per_optimizer_step(tmp_path):
    cb = RenormCallback([Renorm(FFN, method="unit", at="step")], ticks="none", dirpath=tmp_path / "ticks")
    fit(tmp_path, tiny.HFClassifier(tiny.tiny_bert()), [cb], max_steps=3, accumulate_grad_batches=2)
    assert cb.engine.applications == [3]


def test_resume_matches_uninterrupted_run(tmp_path):
    # resume at an epoch boundary: Lightning's own resume is exact there (mid-epoch it replays data differently)
    def specs():
        return [Renorm(ATTN, method="layernorm", at="every:2"), Renorm(FFN, method="unit", at="step")]

    def run(root, module, epochs, ticks_dir, ckpt=None):
        cb = RenormCallback(specs(), ticks="every:1", dirpath=ticks_dir)
        trainer = tiny.trainer(root, callbacks=[cb], max_epochs=epochs, max_steps=-1)
        trainer.fit(module, tiny.loader(tiny.token_dataset(32)), ckpt_path=ckpt)  # 4 steps per epoch
        return trainer, cb

    full = tiny.HFClassifier(tiny.tiny_bert())
    run(tmp_path / "a", full, 2, tmp_path / "a_ticks")
    trainer, _ = run(tmp_path / "b", tiny.HFClassifier(tiny.tiny_bert()), 1, tmp_path / "b_ticks")
    trainer.save_checkpoint(tmp_path / "b.ckpt")
    resumed = tiny.HFClassifier(tiny.tiny_bert(initializer_range=0.5))  # different init: the checkpoint must win
    _, cb = run(tmp_path / "b", resumed, 2, tmp_path / "b_ticks", ckpt=tmp_path / "b.ckpt")
    assert cb.engine.applications == [4, 8]  # counts restored from the checkpoint, then continued

    for (name, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    ticks_a, ticks_b = load_ticks(tmp_path / "a_ticks"), load_ticks(tmp_path / "b_ticks")
    assert ticks_b.attempt.nunique() == 2 and ticks_b.run.nunique() == 1 and len(ticks_a) == len(ticks_b) > 0
    torch.testing.assert_close(torch.tensor(ticks_a.value.values), torch.tensor(ticks_b.value.values), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- bad input
def model_with_oddities():
    model = tiny.HFClassifier(tiny.tiny_bert())
    model.model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    model.register_parameter("qweight", torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False))
    return model


@pytest.mark.parametrize("specs,match", [
    ([Renorm("*.atention.*.weight")], r"matches nothing. Closest parameter names: \[.*attention"),
    ([Renorm("linear")], r"1-D parameter '.*bias' of shape \[\d+\].*target=\['linear', '!\*\.bias'\]"),
    ([Renorm("*.word_embeddings.weight")], r"frozen parameter 'model.bert.embeddings.word_embeddings.weight'"),
    ([Renorm("qweight")], r"quantized parameter 'qweight'"),
    ([Renorm(FFN, dim=2)], r"dim=2 is out of range .* valid: -2..1"),
    ([Renorm(FFN, at="log:5")], r"need the run's total number of steps"),
    ([Renorm(FFN), Renorm("*.intermediate.*.weight", at="step")], r"both target parameter"),
    ([Renorm("*.attn.c_attn.weight", method="unit", dim=0, fold="*.ln_1")], r"matches nothing"),
    ([Renorm(FFN, method="unit", dim=0, fold="*.nonexistent_norm")], r"fold='\*.nonexistent_norm'.*matches nothing"),
])
def test_setup_rejects_bad_targets(specs, match):
    engine = RenormEngine(specs, TickSchedule.parse("every:10"))
    with pytest.raises(RenormError, match=match):
        engine.setup(model_with_oddities(), total_steps=None)


def test_ticks_without_schedule_and_non_renorm_specs():
    with pytest.raises(RenormError, match=r"at='ticks' but no tick schedule"):
        RenormEngine([Renorm(FFN)], None).setup(tiny.HFClassifier(tiny.tiny_bert()))
    with pytest.raises(RenormError, match=r"renorm\[0\] is 'linear'; pass Renorm"):
        RenormEngine(["linear"])


def test_error_is_raised_before_training(tmp_path):
    steps = []

    class Count(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            steps.append(trainer.global_step)

    with pytest.raises(RenormError, match="matches nothing"):
        fit(tmp_path, tiny.HFClassifier(tiny.tiny_bert()), [RenormCallback([Renorm("nope.*")]), Count()])
    assert steps == []


# ------------------------------------------------------------------------------------------------- fold
def test_fold_preserves_function_gpt2():
    model = tiny.tiny_gpt2().eval()
    with torch.no_grad():  # make the norms non-trivial so a wrong fold would show
        for n, p in model.named_parameters():
            if ".ln_" in n:
                p.add_(torch.randn_like(p) * 0.3)
    ids = tiny.token_dataset(8).tensors[0]
    with torch.no_grad():
        expected = model(input_ids=ids).logits.double()
    specs = [Renorm("*.attn.c_attn.weight", method="unit", dim=0, at="step", fold="*.ln_1"),
             Renorm("*.mlp.c_fc.weight", method="unit", dim=0, at="step", fold="*.ln_2")]
    engine = RenormEngine(specs)
    engine.resolve(model)
    blocks = engine.apply(0, True, None, record=True)
    with torch.no_grad():
        got = model(input_ids=ids).logits.double()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)  # same function, fp32 rounding only
    for block in model.transformer.h:  # GPT-2 Conv1D weights are [in, out]: input columns are rows here
        torch.testing.assert_close(block.attn.c_attn.weight.norm(dim=1), torch.ones(32))
        torch.testing.assert_close(block.mlp.c_fc.weight.norm(dim=1), torch.ones(32))
    names = [n for b in blocks for n in b.names]
    assert "transformer.h.0.ln_1.weight" in names and "transformer.h.1.mlp.c_fc.weight" in names


def test_fold_shared_scale_linear_vit():
    model = tiny.tiny_vit().eval()
    x = tiny.image_dataset(4).tensors[0]
    with torch.no_grad():
        expected = model(pixel_values=x).logits.double()
    spec = Renorm("*.attention.[qkv]_proj.weight", method="unit", dim=0, at="ticks", fold="*.layernorm_before")
    engine = RenormEngine([spec], TickSchedule.parse("every:5"))
    engine.resolve(model)
    assert engine.due(5, True) and not engine.due(6, False)
    engine.apply(5, True, None, record=False)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits.double(), expected, rtol=1e-4, atol=1e-5)
    att = model.vit.layers[0].attention
    joint = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]).norm(dim=0)  # Q, K, V share the input
    torch.testing.assert_close(joint, torch.ones(32))


def test_fold_ambiguous_pairing_is_an_error():
    engine = RenormEngine([Renorm("*.attn.c_attn.weight", method="unit", dim=0, at="step", fold="*.ln_?")])
    with pytest.raises(RenormError, match=r"could be fed by any of .*ln_1.*ln_2"):
        engine.setup(tiny.tiny_gpt2())
