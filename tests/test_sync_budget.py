"""The sync budget, measured in real Trainer steps: what TickCallback makes the host and the device wait for.

The promise (docs/schedule.md, issue #19): between ticks no host sync and no host-to-device copy, whatever
states are on (with ``nonfinite`` off); on a tick exactly one device-to-host copy (all values in one
``cat`` + ``.cpu()``) and nothing else; with ``nonfinite`` in the schedule one host read per optimizer step.

On CPU the accelerator is simulated (``tests/instruments.HostTraffic(device="cpu")``) and the statistics
use their accelerator kernels (``stats._device_rows``: the CPU path reads values on the host, which costs
nothing there). Only events raised below ``tick_lightning`` code count: the optimizer's and Lightning's own
work is not the library's budget. The ``cuda`` variants run the same checks on a GPU, there also under
``torch.cuda.set_sync_debug_mode("error")`` around the callback's hooks on non-tick steps, which raises on
any synchronizing CUDA call the Python-level instrument cannot see.
"""

from __future__ import annotations

import lightning as L
import pytest
import tiny
import torch
from instruments import LIBRARY, HostTraffic, load_module

from tick_lightning import Guard, Renorm, TickCallback, stats
from tick_lightning.store import STATES

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
#: every recorded state; snapshot is a documented extra copy per parameter, so it is left out
ALL_STATES = [s for s in STATES if s != "snapshot"]
STEPS = 6
TICKS = (0, 4, STEPS - 1)  # the fit's last step is always a tick
RENORM = [Renorm("model.bert.encoder.layer.*.attention.self.*.weight", method="unit", at="step")]
_HOOKS = ("on_train_batch_start", "on_before_backward", "on_before_optimizer_step", "on_train_batch_end")


@pytest.fixture(autouse=True)
def accelerator_kernels(monkeypatch):
    """CPU tensors take the statistics path that accelerator tensors take (it never reads values)."""
    monkeypatch.setattr(stats, "_host_rows", stats._device_rows)


class Classifier(tiny.HFClassifier):
    """``tensor_lr``: the learning rate as a tensor, as schedulers and capturable optimizers keep it."""

    def __init__(self, model, tensor_lr: bool = False, fused: bool = False):
        super().__init__(model)
        self.tensor_lr, self.fused = tensor_lr, fused

    def configure_optimizers(self):
        lr = torch.tensor(self.lr, device=self.device) if self.tensor_lr else self.lr
        return torch.optim.AdamW(self.parameters(), lr=lr, foreach=False, fused=self.fused or None)


class StepLabel(L.Callback):
    """First in the callback list: labels every event with the optimizer step that is being made."""

    def __init__(self, traffic: HostTraffic):
        self.traffic = traffic

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.traffic.label = trainer.global_step

    def on_train_end(self, trainer, pl_module):
        self.traffic.label = "end"


def strict_syncs(callback: TickCallback, ticks) -> None:
    """CUDA only: every hook of ``callback`` on a non-tick step runs under ``set_sync_debug_mode("error")``."""
    def wrap(hook):
        def run(trainer, *args, **kwargs):
            mode = "default" if trainer.global_step in ticks else "error"
            torch.cuda.set_sync_debug_mode(mode)
            try:
                return hook(trainer, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return run

    for name in _HOOKS:
        setattr(callback, name, wrap(getattr(callback, name)))


def run(tmp_path, device, *, ticks=",".join(map(str, TICKS)), states=ALL_STATES, renorm=RENORM,
        accumulate=2, tensor_lr=False, steps=STEPS, dense=True, dense_flush_every=256, guard=None) -> HostTraffic:
    traffic = HostTraffic(device=device)
    callback = TickCallback(ticks=ticks, states=states, renorm=renorm, dirpath=tmp_path / "ticks",
                            log_to_loggers=False, dense=dense, dense_flush_every=dense_flush_every, guard=guard,
                            activations="model.bert.encoder.layer.?.output" if "activation" in states else None)
    if device == "cuda":
        strict_syncs(callback, TICKS)
    # on CUDA the guard needs an optimizer that skips on the device (fused: AdamW's step counts stay on the GPU)
    model = Classifier(tiny.tiny_bert(), tensor_lr=tensor_lr, fused=guard is not None and device == "cuda")
    trainer = tiny.trainer(tmp_path, accelerator=device, callbacks=[StepLabel(traffic), callback],
                           max_steps=steps, accumulate_grad_batches=accumulate)
    data = tiny.loader(tiny.token_dataset(8 * accumulate * steps))
    with traffic:
        trainer.fit(model, data)
    assert trainer.global_step == steps
    return traffic


def _budget(traffic: HostTraffic, step) -> tuple[int, int, int]:
    return traffic.count("sync", step), traffic.count("h2d", step), traffic.count("d2h", step)


#: every dense series, ``update_norm`` included (the default records loss and grad_norm)
DENSE_ALL = ["loss", "grad_norm", "update_norm"]


@pytest.mark.parametrize("device", DEVICES)
def test_no_host_traffic_between_ticks(tmp_path, device):
    """Every state on, every dense series on, renorm after every step, accumulation 2: non-tick steps move nothing."""
    traffic = run(tmp_path, device, dense=DENSE_ALL)
    for step in sorted(set(range(STEPS)) - set(TICKS)):
        assert _budget(traffic, step) == (0, 0, 0), f"step {step}:\n{traffic.report(step)}"


#: each mode, acting from the second step on (warm-up 1-2 steps), with its skip path for a plain AdamW
GUARDS = [Guard("clip", warmup=2, z=0.1), Guard("zclip", warmup=2, z=0.1), Guard("skip", warmup=2, window=3, z=0.1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("guard", GUARDS, ids=lambda g: g.mode)
def test_guard_adds_no_host_traffic(tmp_path, device, guard):
    """The guard judges and acts on every step (thresholds so low that it does) and still moves nothing between
    ticks: its statistics, decisions, gradient scaling and skip (on CPU the ``copy`` path of a plain AdamW; on
    CUDA the ``fused`` one, under ``set_sync_debug_mode("error")``) stay on the device. The decision rows ride in the tick's copy; an intervention is an event, so the tick after one adds
    the flight recorder's dump (one more copy, docs/records.md), and nothing else."""
    traffic = run(tmp_path, device, dense=DENSE_ALL, guard=guard)
    for step in sorted(set(range(STEPS)) - set(TICKS)):
        assert _budget(traffic, step) == (0, 0, 0), f"step {step}:\n{traffic.report(step)}"
    assert _budget(traffic, 0) == (0, 0, 1), traffic.report(0)  # nothing to act on yet (warm-up)
    assert _budget(traffic, 4) == (0, 0, 2), traffic.report(4)
    from tick_lightning import load_guard

    assert len(load_guard(tmp_path / "ticks")) >= 1  # it did act (an event before tick 4: its dump)


@pytest.mark.parametrize("device", DEVICES)
def test_dense_flush_is_one_copy_and_steps_between_flushes_move_nothing(tmp_path, device):
    """``dense_flush_every=2``, ticks at 0 (and the last step, 5): steps 2 and 4 fill the buffer and copy it (one
    d2h, no sync, no host-to-device copy); steps 1 and 3 move nothing; the tick steps stay one copy."""
    traffic = run(tmp_path, device, ticks="0", dense=DENSE_ALL, dense_flush_every=2, renorm=None)
    for step in (0, 5):
        assert _budget(traffic, step) == (0, 0, 1), traffic.report(step)
    for step in (1, 3):
        assert _budget(traffic, step) == (0, 0, 0), f"step {step}:\n{traffic.report(step)}"
    for step in (2, 4):
        assert _budget(traffic, step) == (0, 0, 1), f"step {step}:\n{traffic.report(step)}"


@pytest.mark.parametrize("device", DEVICES)
def test_one_host_copy_per_tick(tmp_path, device):
    """With the dense buffer riding in the same copy."""
    traffic = run(tmp_path, device, dense=DENSE_ALL)
    for step in TICKS:
        assert _budget(traffic, step) == (0, 0, 1), f"tick {step}:\n{traffic.report(step)}"


@pytest.mark.parametrize("state", [s for s in ALL_STATES if s != "renorm"])
def test_one_host_copy_per_tick_each_state(tmp_path, state):
    """One state at a time (with ``loss``, so there is always a device value to copy): names the culprit."""
    traffic = run(tmp_path, "cpu", states=sorted({state, "loss"}), renorm=None)
    for step in TICKS:
        assert _budget(traffic, step) == (0, 0, 1), f"state {state}, tick {step}:\n{traffic.report(step)}"


@pytest.mark.parametrize("device", DEVICES)
def test_tensor_learning_rate_travels_in_the_one_copy(tmp_path, device):
    traffic = run(tmp_path, device, states=["loss", "lr"], renorm=None, tensor_lr=True)
    for step in TICKS:
        assert _budget(traffic, step) == (0, 0, 1), f"tick {step}:\n{traffic.report(step)}"
    for step in sorted(set(range(STEPS)) - set(TICKS)):
        assert _budget(traffic, step) == (0, 0, 0), f"step {step}:\n{traffic.report(step)}"


@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_costs_one_read_per_optimizer_step(tmp_path, device):
    """The documented cost of ``nonfinite``: one host read per optimizer step (not per micro-batch)."""
    traffic = run(tmp_path, device, ticks="0,4,nonfinite", renorm=None)
    for step in sorted(set(range(STEPS)) - set(TICKS)):
        assert _budget(traffic, step) == (1, 0, 0), f"step {step}:\n{traffic.report(step)}"
    assert all(e.op == "aten._local_scalar_dense.default" for e in traffic.events
               if e.kind == "sync" and e.label not in TICKS)


LEAKY = """
from tick_lightning import TickCallback


class Leaky(TickCallback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        pl_module.model.classifier.weight.sum().item()
"""


def test_the_instrument_sees_a_leaky_callback(tmp_path):
    """The budget tests can fail: a callback that reads a device value on every step is caught."""
    leaky = load_module(tmp_path / "leaky.py", LEAKY)
    traffic = HostTraffic(device="cpu", scope=(LIBRARY, str(tmp_path / "leaky.py")))
    trainer = tiny.trainer(tmp_path, max_steps=3,
                           callbacks=[StepLabel(traffic), leaky.Leaky(ticks="0", states=["loss"], dirpath=tmp_path / "t")])
    with traffic:
        trainer.fit(Classifier(tiny.tiny_bert()), tiny.loader(tiny.token_dataset(24)))
    assert [_budget(traffic, s) for s in range(3)] == [(1, 0, 1), (1, 0, 0), (1, 0, 1)]  # 2: the last step, a tick
