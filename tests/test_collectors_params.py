"""The per-parameter and input collectors driven directly, without ``Trainer.fit`` (``Drive`` and the fp64
references: tests/test_collectors.py): ``weight``, ``grad``, ``update``, ``weight_hist`` / ``grad_hist``,
``snapshot``, ``norm_input``, ``activation``, in fp32, bf16 and fp16.

Tolerances. The statistics accumulate in fp32; the tensors here have at most 40 elements (a few fp32
roundings): norm / std / rms rtol 1e-5, mean rtol 1e-5 with atol 1e-6 (means near zero of values of size
~1). bf16 and fp16 tensors widen to fp32 exactly, so their statistics are held to the same fp32 tolerances
against the fp64 statistics of the half-precision values themselves. Kurtosis (a fourth moment over a
squared variance): rtol 1e-4. absmax, non-finite counts and histogram counts: exact. Update norms: see
``test_update_of_a_plain_sgd_step_is_lr_times_grad``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_collectors import Drive, assert_close, inputs, names, of, ref_moments, ref_stats, tiny_model
from torch import nn

from tick_lightning import TickCallback
from tick_lightning.collect import (
    ActivationCollector,
    GradCollector,
    HistogramCollector,
    NormInputCollector,
    ParamSet,
    SnapshotCollector,
    UpdateCollector,
    WeightCollector,
)

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL, ATOL = 1e-5, 1e-6  # fp32 accumulation (fp32 and bf16 tensors), see the module docstring
U32 = 2.0**-24  # fp32 unit roundoff


def param_set(model: nn.Module, *only: str) -> ParamSet:
    return ParamSet([(n, p) for n, p in model.named_parameters() if not only or n in only])


def stats_before(model: nn.Module) -> dict:
    return {n: ref_stats(p) for n, p in model.named_parameters()}


# ---------------------------------------------------------------- weight, grad
def test_weight_stats_are_the_weights_before_the_update():
    model = tiny_model()
    model[0].bias.requires_grad_(False)  # frozen: still a weight, not trainable
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    drive = Drive([WeightCollector(param_set(model))])
    drive.batch(model(inputs(1)[0]).square().mean())
    want = stats_before(model)
    drive.before_step(sgd)
    sgd.step()  # moves every weight but the frozen bias before blocks()
    rows = drive.end()
    assert names(rows, "weight") == [n for n, _ in model.named_parameters()]
    for n, p in model.named_parameters():
        assert_close(of(rows, "weight", n), want[n], RTOL, ATOL, what=n)
        if p.requires_grad:  # the reference really is the weight before the step
            assert ref_stats(p)["norm"] != pytest.approx(want[n]["norm"], rel=1e-4)


def test_grad_per_parameter_stats_and_the_global_norm_over_every_stepped_parameter():
    model = tiny_model()
    model[0].bias.requires_grad_(False)
    selected = param_set(model, "1.weight", "1.bias", "2.weight", "0.bias")  # select narrows the rows only
    sgd = torch.optim.SGD([{"params": [model[0].weight, *model[1].parameters()]},  # two param groups
                           {"params": model[2].parameters(), "lr": 0.01}], lr=0.1)
    drive = Drive([GradCollector(selected)])
    xs = inputs(2)
    for x in xs:  # accumulation: the gradient of the tick is the sum over its micro-batches
        drive.batch(model(x).square().mean() / 2)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    drive.before_step(sgd)
    sgd.step()
    sgd.zero_grad()
    rows = drive.end()
    assert names(rows, "grad") == ["1.weight", "1.bias", "2.weight", ""]  # the trainable selected, then the global
    for n in ("1.weight", "1.bias", "2.weight"):
        assert_close(of(rows, "grad", n), ref_stats(grads[n]), RTOL, ATOL, what=n)
    total = math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))  # incl. 0.weight, 2.bias
    assert of(rows, "grad", "")["norm"] == pytest.approx(total, rel=RTOL)
    assert of(rows, "grad", "")["nonfinite"] == 0.0
    # the same norm from an fp64 copy of the model: the tick's gradient is the accumulated one. fp32 forward /
    # backward against fp64 through three layers: rtol 1e-4
    ref = tiny_model().double()
    ref[0].bias.requires_grad_(False)
    sum(ref(x.double()).square().mean() / 2 for x in xs).backward()
    fp64 = math.sqrt(sum(float(p.grad.square().sum()) for p in ref.parameters() if p.grad is not None))
    assert of(rows, "grad", "")["norm"] == pytest.approx(fp64, rel=1e-4)


def test_grad_nonfinite_elements_are_counted_per_parameter_and_globally():
    model = tiny_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    drive = Drive([GradCollector(param_set(model, "2.weight", "1.bias"))])
    drive.batch(model(inputs(1)[0]).square().mean())
    model[2].weight.grad[1, 2] = math.inf
    model[2].weight.grad[0, 0] = -math.inf
    model[0].weight.grad[0, 1] = math.nan  # not selected: counted in the global row only
    drive.before_step(sgd)
    rows = drive.end()
    assert of(rows, "grad", "2.weight")["nonfinite"] == 2.0 and of(rows, "grad", "2.weight")["absmax"] == math.inf
    assert_close(of(rows, "grad", "1.bias"), ref_stats(model[1].bias.grad), RTOL, ATOL)
    assert of(rows, "grad", "")["nonfinite"] == 3.0
    assert math.isnan(of(rows, "grad", "")["norm"])  # NaN and inf elements: the norm is NaN


def test_two_optimizers_each_parameter_at_its_own_step():
    """Manual optimization: optimizer 0 steps model[0], then optimizer 1 steps the rest. Weights are read at
    the first before_step (the others have not moved), gradients and update copies at each one's own step."""
    model = tiny_model()
    first = torch.optim.SGD(model[0].parameters(), lr=0.5)
    second = torch.optim.SGD([*model[1].parameters(), *model[2].parameters()], lr=0.25)
    params = param_set(model)
    drive = Drive([WeightCollector(params), GradCollector(params), UpdateCollector(params)], optimizers=2)
    drive.batch(model(inputs(1)[0]).square().mean())
    weights = stats_before(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    drive.before_step(first, 0)
    first.step()
    model[1].weight.grad.mul_(3.0)  # what optimizer 1 steps with (e.g. a second backward): recorded at its step
    grads["1.weight"] = model[1].weight.grad.clone()
    drive.before_step(second, 1)
    second.step()
    rows = drive.end()
    for n, p in model.named_parameters():
        assert_close(of(rows, "weight", n), weights[n], RTOL, ATOL, what=n)
        assert_close(of(rows, "grad", n), ref_stats(grads[n]), RTOL, ATOL, what=n)
        exact = float(torch.linalg.vector_norm(p.detach().double() - before[n]))
        assert of(rows, "update", n)["norm"] == pytest.approx(exact, rel=1e-6), n
    total = math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))
    assert of(rows, "grad", "")["norm"] == pytest.approx(total, rel=RTOL)


def test_an_optimizer_without_gradients_warns_and_records_no_grad():
    model = tiny_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    drive = Drive([GradCollector(param_set(model))], step=7)
    with pytest.warns(UserWarning, match="at step 7 none of optimizer 0's trainable parameters has a gradient"):
        drive.before_step(sgd)
    assert drive.end() == {}


# ---------------------------------------------------------------- update
def test_update_of_a_plain_sgd_step_is_lr_times_grad():
    """SGD without momentum or decay applies -lr * g. Two references: the exact fp64 difference of the fp32
    weights (the recorded norm is that difference's fp32 norm: rtol 1e-6), and lr |g| in fp64, from which the
    fp32 step p - lr g differs by its rounding, at most u (|p_after| + lr |g|) in norm (u = 2^-24; 2x margin)."""
    model, lr = tiny_model(), 0.5
    model[0].bias.requires_grad_(False)
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    drive = Drive([UpdateCollector(param_set(model))])
    drive.batch(model(inputs(1)[0]).square().mean())
    grads = {n: p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None}
    before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    drive.before_step(sgd)
    sgd.step()
    rows = drive.end()
    assert names(rows, "update") == ["0.weight", "1.weight", "1.bias", "2.weight", "2.bias"]  # trainable only
    for n, p in model.named_parameters():
        if n not in grads:
            continue
        got, after = of(rows, "update", n), p.detach().double()
        assert got["norm"] == pytest.approx(float(torch.linalg.vector_norm(after - before[n])), rel=1e-6), n
        want = lr * float(torch.linalg.vector_norm(grads[n]))
        bound = 2 * U32 * (float(torch.linalg.vector_norm(after)) + want) + 1e-6 * want
        assert abs(got["norm"] - want) <= bound, (n, got["norm"], want, bound)
        assert got["ratio"] == pytest.approx(want / float(torch.linalg.vector_norm(before[n])),
                                             rel=bound / want + 1e-6), n


# ---------------------------------------------------------------- histograms
LO, HI = -32, 16  # the documented default bins (tick_lightning.histograms)
COLUMNS = ("zero", "negative", "nonfinite", "under", *(f"2^{e}" for e in range(LO, HI)), "over")


def ref_histogram(t: torch.Tensor) -> np.ndarray:
    """The documented binning by comparisons against the edges 2**LO .. 2**HI (not frexp, as the code does)."""
    x = t.detach().double().reshape(-1).numpy()
    finite = np.isfinite(x)
    a = np.abs(x[finite])
    pos = np.searchsorted(2.0 ** np.arange(LO, HI + 1), a[a > 0], side="right") - 1  # 2**(LO+pos) <= |x|
    k = HI - LO
    return np.array([np.sum(a == 0), np.sum(x[finite] < 0), np.sum(~finite), np.sum(pos < 0),
                     *(np.sum(pos == j) for j in range(k)), np.sum(pos >= k)], dtype=np.float64)


EDGY = [0.0, -0.0, 1e-12, 2.0**-32, -(2.0**-33), 2.0**-32 * 1.5, 1.0, -1.0, 0.75, 2.0**16, 65535.0, -1e30,
        math.inf, -math.inf, math.nan, -0.1]  # zeros, under, exact edges, over, non-finite


@pytest.mark.parametrize("state", ["weight_hist", "grad_hist"])
def test_histograms_follow_the_documented_log2_bins(state):
    torch.manual_seed(0)
    layer = nn.Linear(4, 4)
    half = nn.Parameter(torch.randn(3, 5).bfloat16())  # widened to fp32 exactly
    params = ParamSet([("w", layer.weight), ("b", layer.bias), ("h", half)])
    sgd = torch.optim.SGD([layer.weight, layer.bias, half], lr=0.0)
    values = torch.tensor(EDGY).reshape(4, 4)
    with torch.no_grad():
        if state == "weight_hist":
            layer.weight.copy_(values)
        else:
            for _, p in params.selected:
                p.grad = torch.randn_like(p) * 1e-3
            layer.weight.grad = values.clone()
    drive = Drive([HistogramCollector(params, state)])
    drive.before_step(sgd)
    tensors = {n: (p if state == "weight_hist" else p.grad).detach().clone() for n, p in params.selected}
    rows = drive.end()
    assert names(rows, state) == ["w", "b", "h"]
    for n, t in tensors.items():
        got = of(rows, state, n)
        assert tuple(got) == COLUMNS
        counts = np.array(list(got.values()))
        np.testing.assert_array_equal(counts, ref_histogram(t), err_msg=n)
        assert counts[0] + counts[2:].sum() == t.numel()  # zero, nonfinite, under .. over partition the tensor
    if state == "weight_hist":
        w = of(rows, state, "w")
        assert (w["zero"], w["negative"], w["nonfinite"], w["under"], w["over"]) == (2, 4, 3, 2, 2)  # -0.0 and -inf are not
        assert (w["2^-32"], w["2^0"], w["2^-1"], w["2^15"]) == (2, 2, 1, 1)


# ---------------------------------------------------------------- snapshot
def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_snapshot_files_read_back_bit_exactly(tmp_path):
    """The collector's copies written by the callback's own writer (``TickCallback._save_snapshot``; a fake
    ``self`` with just the recorder's ``snapshot_dir``, a fake trainer with just ``global_rank``)."""
    model = tiny_model()
    half = nn.Parameter(torch.randn(2, 3).bfloat16())
    params = ParamSet([*model.named_parameters(), ("half", half)])
    sgd = torch.optim.SGD([*model.parameters(), half], lr=0.5)
    snapshot = SnapshotCollector(params)
    drive = Drive([snapshot], step=12)
    drive.batch(model(inputs(1)[0]).square().mean() + half.float().square().sum())
    before = {n: p.detach().clone() for n, p in params.selected}
    drive.before_step(sgd)
    sgd.step()  # the copies are of the weights before the update
    tensors = snapshot.tensors
    assert drive.end() == {} and snapshot.tensors is None  # no rows; the references dropped at close
    owner = SimpleNamespace(_recorder=SimpleNamespace(snapshot_dir=tmp_path / "snapshots"))
    TickCallback._save_snapshot(owner, SimpleNamespace(global_rank=0), 12, tensors)
    back = load_file(str(tmp_path / "snapshots" / "step00000012-rank0.safetensors"))
    assert set(back) == set(before)
    for n, p in params.selected:
        assert back[n].dtype == p.dtype and back[n].shape == p.shape
        assert torch.equal(bits(back[n]), bits(before[n])), n
        assert not torch.equal(bits(p.detach()), bits(before[n])), n  # the step moved it: a copy, not a view


# ---------------------------------------------------------------- bf16, fp16
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weight_grad_and_update_stats_against_fp64_of_their_values(dtype):
    model = tiny_model(dtype)
    sgd = torch.optim.SGD(model.parameters(), lr=0.5)
    params = param_set(model)
    drive = Drive([WeightCollector(params), GradCollector(params), UpdateCollector(params)])
    drive.batch(model(inputs(1, dtype)[0]).float().square().mean())
    assert all(p.grad.dtype == dtype for p in model.parameters())
    weights = stats_before(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    drive.before_step(sgd)
    sgd.step()
    rows = drive.end()
    for n, p in model.named_parameters():
        assert_close(of(rows, "weight", n), weights[n], RTOL, ATOL, what=n)
        assert_close(of(rows, "grad", n), ref_stats(grads[n]), RTOL, ATOL, what=n)
        # the difference of two bf16 / fp16 values is exact in fp32 (the update is taken in fp32, not in half)
        exact = float(torch.linalg.vector_norm(p.detach().double() - before[n]))
        assert exact > 0 and of(rows, "update", n)["norm"] == pytest.approx(exact, rel=RTOL), n
    total = math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))
    assert of(rows, "grad", "")["norm"] == pytest.approx(total, rel=RTOL)


# ---------------------------------------------------------------- norm_input, activation
def hooks(*modules: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in modules)


def test_norm_input_equals_the_inputs_a_hook_saw_and_ignores_forwards_while_paused():
    model, idle = tiny_model(), nn.LayerNorm(8)
    ln = model[1]
    collector = NormInputCollector([("1", ln), ("idle", idle)])
    seen = []
    mine = ln.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, scale in ((0, 1.0), (1, 30.0)):  # the second tick's accumulator starts afresh
        seen.clear()
        xs = [x * scale for x in inputs(3, seed=step)]
        drive = Drive([collector], step=step)
        assert len(ln._forward_pre_hooks) == 2 and len(idle._forward_pre_hooks) == 1
        drive.batch(model(xs[0]).square().mean())
        collector.pause()  # validation inside the tick's window
        assert hooks(ln, idle) == 1
        with torch.no_grad():
            model(xs[1] * 100.0)
        collector.resume()
        assert hooks(ln, idle) == 3
        drive.batch(model(xs[2]).square().mean())
        drive.before_step(sgd)
        sgd.step()
        sgd.zero_grad()
        rows = drive.end()
        assert hooks(ln, idle) == 1  # only mine
        assert len(seen) == 3
        assert_close(of(rows, "norm_input", "1"), ref_moments([seen[0], seen[2]]), RTOL, ATOL * scale,
                     exact=("absmax",))
        k = of(rows, "norm_input", "1")["kurtosis"]
        assert k == pytest.approx(ref_moments([seen[0], seen[2]])["kurtosis"], rel=1e-4)
        assert all(math.isnan(v) for v in of(rows, "norm_input", "idle").values())  # saw nothing
    mine.remove()
    assert hooks(ln, idle) == 0
    collector.resume()  # after close: does not re-attach
    assert hooks(ln, idle) == 0


class Patched(nn.Module):
    """A patched norm layer's protocol (``tick_lightning.norms``): it calls its own ``tick_observer``."""

    def __init__(self) -> None:
        super().__init__()
        self.tick_observer = None

    def forward(self, x):
        if self.tick_observer is not None:
            self.tick_observer(x)
        return x


def test_a_patched_norm_layer_gets_an_observer_not_a_hook():
    layer = Patched()
    collector = NormInputCollector([("p", layer)])
    xs = inputs(3)
    drive = Drive([collector])
    assert layer.tick_observer is not None and hooks(layer) == 0
    layer(xs[0])
    collector.pause()
    assert layer.tick_observer is None
    layer(xs[1])
    collector.resume()
    layer(xs[2])
    rows = drive.end(stepped=False)
    assert layer.tick_observer is None
    assert_close(of(rows, "norm_input", "p"), ref_moments([xs[0], xs[2]]), 1e-4, ATOL,
                 exact=("absmax",))  # rtol 1e-4: includes the kurtosis


@dataclass
class Output:
    last_hidden_state: torch.Tensor


class Fn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class Net(nn.Module):
    """Outputs of every kind the activation hook reads: a tensor, a tuple, an HF-style output, an integer one."""

    def __init__(self) -> None:
        super().__init__()
        self.body = tiny_model()
        self.pair = Fn(lambda h: (torch.tanh(h) * 3, h.sum()))
        self.hf = Fn(lambda h: Output(h.exp()))
        self.argmax = Fn(lambda h: h.argmax(-1))

    def forward(self, x):
        h, _ = self.pair(self.body(x))
        self.argmax(h)
        return self.hf(h).last_hidden_state


def test_activation_records_each_chosen_modules_output():
    net = Net()
    chosen = [("body.0", net.body[0]), ("pair", net.pair), ("hf", net.hf), ("argmax", net.argmax)]
    seen = {n: [] for n, _ in chosen}
    mine = [net.body[0].register_forward_hook(lambda m, a, out: seen["body.0"].append(out.detach().clone())),
            net.pair.register_forward_hook(lambda m, a, out: seen["pair"].append(out[0].detach().clone())),
            net.hf.register_forward_hook(lambda m, a, out: seen["hf"].append(out.last_hidden_state.detach()))]
    collector = ActivationCollector(chosen)
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    drive = Drive([collector])
    xs = inputs(3)
    drive.batch(net(xs[0]).mean())
    collector.pause()
    with torch.no_grad():
        net(xs[1])
    collector.resume()
    drive.batch(net(xs[2]).mean())
    drive.before_step(sgd)
    rows = drive.end()
    for handle in mine:
        handle.remove()
    assert hooks(*net.modules()) == 0  # the collector's hooks are gone
    assert names(rows, "activation") == ["body.0", "pair", "hf", "argmax"]
    for n in ("body.0", "pair", "hf"):
        assert len(seen[n]) == 3
        assert_close(of(rows, "activation", n), ref_moments([seen[n][0], seen[n][2]]), 1e-4, ATOL,
                     exact=("absmax",), what=n)  # rtol 1e-4: includes the kurtosis
    assert all(math.isnan(v) for v in of(rows, "activation", "argmax").values())  # integer output: not observed
