"""Self-checks of the peer implementations (CPU, one thread, seconds).

    .venv/bin/python -m pytest -q benchmarks/peers/test_peers.py

Expected values are computed by hand here (Python floats, i.e. fp64), independently of the code under test.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from .adagc import AdaGC, AdaGCCallback
from .zclip import ZClip, ZClipCallback

torch.set_num_threads(1)


def _set_grad(p: torch.Tensor, values) -> torch.Tensor:
    p.grad = torch.tensor(values, dtype=p.dtype)
    return p.grad


# ----------------------------------------------------------------------------------------------- ZClip
WARMUP_NOISE = [0.013, -0.021, 0.004, 0.017, -0.009, -0.015, 0.022, 0.001, -0.006, 0.011, -0.019, 0.008,
                0.0, -0.012, 0.016, -0.003, 0.019, -0.024, 0.007, 0.002, -0.008, 0.014, -0.017, 0.005, 0.01]


def test_zclip_matches_hand_computed_sequence():
    alpha, zt = 0.97, 2.5
    z = ZClip()  # defaults: alpha 0.97, z_thresh 2.5, warm-up 25, max_grad_norm None
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    norms = [1.0 + e for e in WARMUP_NOISE]
    assert len(norms) == 25
    for i, n in enumerate(norms):  # grad (0.6n, 0.8n) has norm n
        g = _set_grad(p, [0.6 * n, 0.8 * n]).clone()
        assert z.step([p]) == pytest.approx(n, rel=1e-14)
        assert torch.equal(p.grad, g)  # warm-up: never clipped
        assert z.initialized == (i == 24)
    mu = sum(norms) / 25
    var = sum((x - mu) ** 2 for x in norms) / 25  # population variance
    assert z.mean == pytest.approx(mu, rel=1e-14) and z.var == pytest.approx(var, rel=1e-12)

    for n in (1.01, 0.995):  # ordinary steps: EMA with the raw norm, the new mean used in the variance
        _set_grad(p, [0.6 * n, 0.8 * n])
        z.step([p])
        mu = alpha * mu + (1 - alpha) * n
        var = alpha * var + (1 - alpha) * (n - mu) ** 2
    assert z.clipped_steps == []
    assert z.mean == pytest.approx(mu, rel=1e-13) and z.var == pytest.approx(var, rel=1e-12)

    g = 100.0 * mu  # the spike
    _set_grad(p, [0.6 * g, 0.8 * g])
    std = math.sqrt(var)
    zscore = (g - mu) / (std + 1e-6)
    thr = mu + zt * std / (zscore / zt)
    assert z.step([p]) == pytest.approx(g, rel=1e-14)
    assert z.clipped_steps == [27]
    assert mu < thr < mu + zt * std
    coef = thr / (g + 1e-6)
    torch.testing.assert_close(p.grad, torch.tensor([0.6 * g * coef, 0.8 * g * coef], dtype=torch.float64),
                               rtol=1e-13, atol=0)
    assert torch.linalg.vector_norm(p.grad).item() == pytest.approx(thr * g / (g + 1e-6), rel=1e-12)
    mu_clipped = alpha * mu + (1 - alpha) * thr  # EMA fed with the threshold, not with 100x
    var = alpha * var + (1 - alpha) * (thr - mu_clipped) ** 2
    assert z.mean == pytest.approx(mu_clipped, rel=1e-13) and z.var == pytest.approx(var, rel=1e-12)
    assert z.mean < alpha * mu + (1 - alpha) * g / 10

    n = 1.0  # the next ordinary step passes untouched
    g1 = _set_grad(p, [0.6 * n, 0.8 * n]).clone()
    z.step([p])
    assert torch.equal(p.grad, g1) and z.clipped_steps == [27]


def test_zclip_max_grad_norm_lowers_the_limit_but_not_the_ema():
    z = ZClip(warmup_steps=3, max_grad_norm=1.5)
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    for n in (1.0, 3.0, 1.1):  # warm-up: only the fixed clip (3.0 > 1.5); the stats see the raw 3.0
        _set_grad(p, [n])
        z.step([p])
    assert z.clipped_steps == [1]
    mu, var = z.mean, z.var
    _set_grad(p, [500.0])
    z.step([p])
    std = math.sqrt(var)
    thr = mu + 2.5 * std / (((500.0 - mu) / (std + 1e-6)) / 2.5)
    assert mu == pytest.approx(1.7, rel=1e-14) and thr > 1.5  # so the fixed limit wins ...
    assert p.grad.item() == pytest.approx(1.5 * 500.0 / (500.0 + 1e-6), rel=1e-12)
    assert z.clipped_steps == [1, 3] and z.spike_steps == [3]
    assert z.mean == pytest.approx(0.97 * mu + 0.03 * thr, rel=1e-13)  # ... but the EMA takes thr


def test_zclip_nan_norm_disables_it_for_good():
    z = ZClip(warmup_steps=3)
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    for n in (1.0, 1.1, 0.9, 1.0):
        _set_grad(p, [n])
        z.step([p])
    _set_grad(p, [float("nan")])
    z.step([p])
    assert math.isnan(z.mean) and z.clipped_steps == []
    _set_grad(p, [1e6])  # a spike after the NaN is not clipped any more
    z.step([p])
    assert p.grad.item() == 1e6 and z.clipped_steps == []


def test_zclip_callback_uses_global_step():
    cb = ZClipCallback(warmup_steps=2)
    module = torch.nn.Linear(2, 1, bias=False).double()
    for step, n in enumerate((1.0, 1.2, 1.1, 80.0)):
        module.weight.grad = torch.tensor([[0.6 * n, 0.8 * n]], dtype=torch.float64)
        cb.on_before_optimizer_step(SimpleNamespace(global_step=100 + step), module, None)
    assert cb.clipped_steps == [103]
    assert cb.norms == pytest.approx([1.0, 1.2, 1.1, 80.0], rel=1e-14)
    assert torch.linalg.vector_norm(module.weight.grad).item() < 1.3


# ----------------------------------------------------------------------------------------------- AdaGC
def test_adagc_clips_only_the_spiking_tensor():
    lam, beta = 1.05, 0.98
    ada = AdaGC(warmup_steps=3)  # paper defaults: lambda_rel 1.05, beta 0.98, lambda_abs 1.0
    a = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    named = [("a", a), ("b", b)]

    def grads(na, nb):
        return _set_grad(a, [0.6 * na, 0.8 * na]).clone(), _set_grad(b, [0.8 * nb, 0.6 * nb]).clone()

    for na, nb in ((0.30, 0.40), (0.20, 0.50), (0.25, 0.45)):  # warm-up, global norm < 1: no clip
        ga, gb = grads(na, nb)
        ada.step(named)
        assert torch.equal(a.grad, ga) and torch.equal(b.grad, gb)
    assert ada.gamma["a"] == pytest.approx(0.20, rel=1e-14)  # running minimum
    assert ada.gamma["b"] == pytest.approx(0.40, rel=1e-14)
    assert ada.clipped_steps == [] and ada.clipped_tensors == 0

    ga, gb = grads(0.205, 0.41)  # adaptive phase, both under lambda_rel * gamma
    ada.step(named)
    assert torch.equal(a.grad, ga) and torch.equal(b.grad, gb)
    gam_a = beta * 0.20 + (1 - beta) * 0.205
    gam_b = beta * 0.40 + (1 - beta) * 0.41
    assert ada.gamma["a"] == pytest.approx(gam_a, rel=1e-13)
    assert ada.gamma["b"] == pytest.approx(gam_b, rel=1e-13)

    ga, gb = grads(50.0, 0.405)  # only a spikes
    total = ada.step(named)
    assert total == pytest.approx(math.hypot(50.0, 0.405), rel=1e-13)
    assert torch.equal(b.grad, gb)  # untouched
    limit = lam * gam_a
    torch.testing.assert_close(a.grad, ga * (limit / (50.0 + 1e-6)), rtol=1e-13, atol=0)
    assert torch.linalg.vector_norm(a.grad).item() == pytest.approx(limit, rel=1e-7)
    assert ada.clipped_steps == [4] and ada.clipped_tensors == 1 and ada.last_clipped == ["a"]
    assert ada.gamma["a"] == pytest.approx(beta * gam_a + (1 - beta) * limit, rel=1e-13)  # clipped norm
    assert ada.gamma["b"] == pytest.approx(beta * gam_b + (1 - beta) * 0.405, rel=1e-13)


def test_adagc_warmup_global_clip_and_minimum_of_clipped_norms():
    ada = AdaGC(warmup_steps=2, lambda_abs=1.0)
    a = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    named = [("a", a), ("b", b)]
    _set_grad(a, [0.3])
    _set_grad(b, [0.4])
    ada.step(named)
    _set_grad(a, [3.0])  # global norm 3.0002...: clipped to 1.0
    _set_grad(b, [0.02])
    ada.step(named)
    coef = 1.0 / (math.hypot(3.0, 0.02) + 1e-6)
    assert a.grad.item() == pytest.approx(3.0 * coef, rel=1e-13)
    assert ada.clipped_steps == [1] and ada.warmup_clipped_steps == [1] and ada.clipped_tensors == 2
    assert ada.gamma["a"] == pytest.approx(0.3, rel=1e-14)
    assert ada.gamma["b"] == pytest.approx(0.02 * coef, rel=1e-13)  # min over *clipped* norms
    assert not ada.in_warmup
    _set_grad(a, [0.3])
    _set_grad(b, [0.4])  # 0.4 > 1.05 * 0.00667: b is clipped from now on, a is not
    ada.step(named)
    assert ada.last_clipped == ["b"] and ada.clipped_steps == [1, 2]


def test_adagc_nan_tensor_norm_poisons_only_that_tensor():
    ada = AdaGC(warmup_steps=1)
    a = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    named = [("a", a), ("b", b)]
    _set_grad(a, [0.5])
    _set_grad(b, [0.5])
    ada.step(named)
    _set_grad(a, [float("nan")])
    _set_grad(b, [0.5])
    ada.step(named)
    assert math.isnan(ada.gamma["a"]) and ada.clipped_steps == []
    _set_grad(a, [1e6])
    _set_grad(b, [1e6])
    ada.step(named)
    assert a.grad.item() == 1e6  # never clipped again
    assert b.grad.item() == pytest.approx(1.05 * 0.5, rel=1e-6)
    assert ada.last_clipped == ["b"]


def test_adagc_callback_uses_global_step():
    cb = AdaGCCallback(warmup_steps=1)
    module = torch.nn.Linear(2, 1).double()
    for step, scale in enumerate((0.1, 0.1, 50.0)):
        module.weight.grad = torch.full((1, 2), 0.1, dtype=torch.float64)
        module.bias.grad = torch.full((1,), 0.1 * scale, dtype=torch.float64)
        cb.on_before_optimizer_step(SimpleNamespace(global_step=10 + step), module, None)
    assert cb.clipped_steps == [12] and cb.clipped_tensors == 1
    assert cb.adagc.last_clipped == ["bias"]


# ------------------------------------------------------------------------------------- OLMo skip-step
@pytest.fixture(scope="module")
def olmo_skip():
    """Skips (with the install command) where ai2-olmo-core is missing: an optional benchmark dependency."""
    return pytest.importorskip(f"{__package__}.olmo_skip", exc_type=ImportError)


def _snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    return params, state


def _same(model, opt, snap) -> bool:
    params, state = snap
    if not all(torch.equal(p, q) for p, q in zip(model.parameters(), params)):
        return False
    for p in model.parameters():
        now, before = opt.state[p], state[id(p)]
        if now.keys() != before.keys() or not all(torch.equal(now[k], before[k]) for k in now):
            return False
    return True


def _olmo_setup(olmo_skip, foreach: bool, history: int = 10):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = olmo_skip.make_skip_step_adamw(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                         weight_decay=0.1, rolling_interval_length=8, sigma_factor=6,
                                         foreach=foreach)
    x, y = torch.randn(16, 4), torch.randn(16, 2)

    def step(loss_value=None, grad_hook=None):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if grad_hook is not None:
            grad_hook()
        opt.latest_loss = loss.detach() if loss_value is None else torch.tensor(loss_value)
        opt.latest_grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        opt.step()
        return float(opt.step_skipped.item())

    for _ in range(history):  # enough history (>= 8 // 2) for the test to be active
        assert step() == 0.0
    return model, opt, step


@pytest.mark.parametrize("foreach", [True, False])
def test_olmo_loss_spike_is_skipped_and_state_untouched(olmo_skip, foreach):
    model, opt, step = _olmo_setup(olmo_skip, foreach)
    losses = torch.stack(opt._losses[-8:])
    spike = (losses.mean() + 10 * losses.std()).item()
    snap = _snapshot(model, opt)
    assert step(loss_value=spike) == 1.0
    assert _same(model, opt, snap)  # parameters, exp_avg, exp_avg_sq and step all bit-identical
    snap = _snapshot(model, opt)
    assert step() == 0.0  # the next ordinary step goes through and changes them
    params, state = snap
    assert not any(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    for p in model.parameters():
        assert not torch.equal(opt.state[p]["exp_avg"], state[id(p)]["exp_avg"])
        assert opt.state[p]["step"].item() == state[id(p)]["step"].item() + 1


@pytest.mark.parametrize("foreach", [True, False])
def test_olmo_nan_grad_is_skipped_but_still_poisons_state(olmo_skip, foreach):
    """OLMo masks the update by multiplying it with 0.0; 0 * NaN = NaN, so a skipped NaN gradient still
    lands in the moments and the parameters. A benchmark should expect this."""
    model, opt, step = _olmo_setup(olmo_skip, foreach)
    w = model.weight

    def poison():
        w.grad[0, 0] = float("nan")

    assert step(grad_hook=poison) == 1.0  # the NaN grad norm trips the test ...
    assert torch.isnan(opt.state[w]["exp_avg"]).any()  # ... and yet the state is NaN
    assert torch.isnan(opt.state[w]["exp_avg_sq"]).any()
    assert torch.isnan(w).any()


@pytest.mark.parametrize("foreach", [True, False])
def test_olmo_skip_with_finite_but_huge_grad(olmo_skip, foreach):
    """A finite gradient whose square overflows (fp32: |g| > ~1.8e19) is skipped cleanly by the per-tensor
    path, but the foreach path (OLMo's config default) squares before masking: inf * 0 = NaN."""
    model, opt, step = _olmo_setup(olmo_skip, foreach)
    w = model.weight

    def huge():
        w.grad[0, 0] = 1e20

    assert step(grad_hook=huge) == 1.0
    assert torch.isnan(opt.state[w]["exp_avg_sq"]).any() == foreach
    assert torch.isnan(w).any() == foreach


def test_olmo_nan_loss_skips_the_whole_window(olmo_skip):
    model, opt, step = _olmo_setup(olmo_skip, foreach=True)
    assert step(loss_value=float("nan")) == 1.0
    skipped = [step() for _ in range(9)]
    assert skipped == [1.0] * 8 + [0.0]  # NaN stays in the 8-step history
    assert not any(torch.isnan(p).any() for p in model.parameters())


def test_olmo_callback_in_a_lightning_run(olmo_skip, tmp_path):
    import lightning.pytorch as pl

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)
            self.micro_losses: list[float] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.lin(x), y)
            self.micro_losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return olmo_skip.make_skip_step_adamw(self.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                                                  weight_decay=0.0, rolling_interval_length=8)

    class Watch(pl.Callback):
        def __init__(self):
            self.before: dict[int, torch.Tensor] = {}
            self.after: dict[int, torch.Tensor] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before.setdefault(trainer.global_step, pl_module.lin.weight.detach().clone())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.after[trainer.global_step - 1] = pl_module.lin.weight.detach().clone()

    torch.manual_seed(0)
    xs = torch.randn(24, 8, 4)
    ys = torch.randn(24, 8, 1)
    ys[18] *= 1000.0  # micro-batch 18 = first half of optimizer step 9
    data = list(zip(xs, ys))
    net, cb, watch = Net(), olmo_skip.OlmoSkipStepCallback(), Watch()
    trainer = pl.Trainer(max_steps=12, accumulate_grad_batches=2, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=[cb, watch])
    trainer.fit(net, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    assert cb.steps_seen == 12
    assert cb.skipped_steps == [9]
    assert torch.equal(watch.before[9], watch.after[9])
    assert not torch.equal(watch.before[10], watch.after[10])
    opt = trainer.optimizers[0]
    # latest_loss is the accumulation-window mean of the micro-batch losses
    expected = [(a + b) / 2 for a, b in zip(net.micro_losses[0::2], net.micro_losses[1::2])]
    assert [t.item() for t in opt._losses] == pytest.approx(expected[-9:], rel=1e-6)
