"""The every-step collectors on their own (no Trainer): ``StepPhase`` routing the shared partial sums to
``DenseCollector`` and ``FlightRecorder``, the ring's wrap-around and watermark, absent gradients, several
optimizers, and FSDP1-style flat shards summed over their group (2 gloo ranks) -- against numpy in fp64."""

from __future__ import annotations

import numpy as np
import pytest
import tiny
import torch
from torch import nn

from tick_lightning import dist
from tick_lightning.collect.dense import DenseCollector
from tick_lightning.collect.flight import FlightRecorder
from tick_lightning.collect.stepwise import StepPhase
from tick_lightning.records import to_host


def make(window=4, capacity=100, series=("loss", "grad_norm", "update_norm"), extras=("update_norm",)):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    second = torch.optim.SGD(model[1].parameters(), lr=0.1)
    phase = StepPhase(DenseCollector(series, capacity), FlightRecorder(window, extras))
    phase.setup([first, second], model, torch.device("cpu"))
    return model, (first, second), phase


def step(model, optimizers, phase, n, skip=(), nan=()):
    """One optimizer step ``n`` of both optimizers; parameters named in ``skip`` get no gradient. Returns the
    fp64 reference: {name: grad norm}, {name: update norm}, the loss."""
    phase.batch_start(n, 0, global_step=n)
    torch.manual_seed(n)
    loss = model(torch.randn(5, 3)).square().mean() * (n + 1)
    loss.backward()
    names = dict(model.named_parameters())
    for name in skip:
        names[name].grad = None
    for name in nan:
        names[name].grad.view(-1)[0] = float("nan")
    grads = {k: float(p.grad.double().norm()) for k, p in names.items() if p.grad is not None}
    before = {k: p.detach().double().clone() for k, p in names.items()}
    for opt in optimizers:
        phase.before_optimizer_step(opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
    updates = {k: float((p.detach().double() - before[k]).norm()) for k, p in names.items()}
    phase.batch_end(loss.detach(), global_step=n + 1, manual=False)
    return grads, updates, float(loss)


def flush(phase, flight=True):
    gather = dist.Gather()
    out = phase.take(gather, dense=True, flight=flight)
    gather.run()
    host = to_host(out.blocks())
    dense_host, flight_host, watch_host, _ = out.split(host)
    if out.watch is not None:  # the layer watch's rows: the steps it had not seen, the dump's gradient block
        assert out.watch.steps == (out.flight.steps if out.flight is not None else out.watch.steps)
        # no norm inputs recorded here; the update norms (recorded) ride along for the update watch
        assert [b.state for b in watch_host] == ["flight"] + (["flight_update"] if out.watch.update else [])
        if out.flight is not None:
            for watched, written in zip(watch_host, flight_host):
                np.testing.assert_array_equal(watched.values, written.values)
    return out, dense_host, flight_host


def test_dense_and_flight_share_one_computation_and_equal_fp64():
    model, opts, phase = make(window=8)
    ref = [step(model, opts, phase, n, skip=("1.bias",) if n == 2 else ()) for n in range(5)]
    out, dense_host, flight_host = flush(phase)
    values = out.dense.host_values(dense_host)
    for n, (grads, updates, loss) in enumerate(ref):
        assert values["loss"][0][n] == pytest.approx(loss, rel=1e-6)
        assert values["grad_norm"][0][n] == pytest.approx(np.sqrt(sum(g * g for g in grads.values())), rel=1e-6)
        assert values["update_norm"][0][n] == pytest.approx(np.sqrt(sum(u * u for u in updates.values())), rel=1e-6)
    table = out.flight.table(flight_host).to_pandas()
    got = {(s, n, k): v for s, n, k, v in zip(table.step, table.name, table.stat, table.value)}
    for n, (grads, updates, _) in enumerate(ref):
        for name in dict(model.named_parameters()):
            if name in grads:
                assert got[(n, name, "grad_norm")] == pytest.approx(grads[name], rel=1e-6)
                assert got[(n, name, "nonfinite")] == 0.0
                assert got[(n, name, "update_norm")] == pytest.approx(updates[name], rel=1e-6, abs=1e-12)
            else:  # no gradient that step: no row (not a zero norm)
                assert (n, name, "grad_norm") not in got
    assert (2, "1.bias", "grad_norm") not in got and (3, "1.bias", "grad_norm") in got


def test_the_ring_wraps_and_each_step_is_taken_once():
    model, opts, phase = make(window=4)
    for n in range(10):
        step(model, opts, phase, n)
    out, _, flight_host = flush(phase)
    assert out.flight.steps == [6, 7, 8, 9]  # the last `window` steps, oldest first
    assert phase.take(dist.Gather(), dense=False, flight=True) is None  # nothing new: nothing again
    ref = [step(model, opts, phase, n) for n in (10, 11, 12)]  # rows 2, 3, 0 of the ring: two slices
    out, _, flight_host = flush(phase)
    assert out.flight.steps == [10, 11, 12]
    table = out.flight.table(flight_host).to_pandas().query("stat == 'grad_norm'")
    for n, (grads, _, _) in zip((10, 11, 12), ref):
        got = table[table.step == n].set_index("name").value
        assert got.to_dict() == pytest.approx(grads, rel=1e-6)


def test_an_open_step_is_not_taken_and_nan_flags_its_parameter():
    model, opts, phase = make(window=4)
    step(model, opts, phase, 0)
    phase.batch_start(1, 0, global_step=1)  # open: a checkpoint between accumulation micro-batches
    out, _, _ = flush(phase)
    assert out.flight.steps == [0]
    phase.end()
    step(model, opts, phase, 2, nan=("1.weight",))
    out, _, flight_host = flush(phase)
    flags = out.flight.table(flight_host).to_pandas().query("stat == 'nonfinite' and step == 2")
    assert flags.set_index("name").value.to_dict() == {"0.weight": 0.0, "0.bias": 0.0, "1.weight": 1.0,
                                                       "1.bias": 0.0}


def test_memory_is_window_x_parameters_x_8_per_series():
    _, _, phase = make(window=16, capacity=10)
    assert phase.flight.nbytes == 2 * 16 * 4 * 8  # grad and update rings, 4 parameter tensors, fp64
    assert phase.dense.nbytes == 11 * (1 + 1 + 1) * 8  # capacity + 1 rows: loss, one placement each
    phase.teardown()
    assert phase.flight.nbytes == 0 and phase.dense.nbytes == 0


def _flat_worker(rank, world, out):
    """FSDP1-like: each rank holds half of a flat parameter; the global norm needs both halves."""
    torch.manual_seed(0)
    full = torch.randn(10, dtype=torch.float64)
    mine = nn.Parameter(full[rank * 5:(rank + 1) * 5].clone())
    mine.grad = mine.detach() * 2
    opt = torch.optim.SGD([mine], lr=0.0)
    module = nn.Module()
    module.flat = mine
    phase = StepPhase(DenseCollector(("loss", "grad_norm"), 8), FlightRecorder(4))
    phase.setup([opt], module, torch.device("cpu"), flat_group=torch.distributed.group.WORLD)
    phase.batch_start(0, 0, 0)
    phase.before_optimizer_step(opt)
    phase.batch_end(torch.tensor(1.0), 1, manual=False)
    out, dense_host, _ = flush(phase)
    got = out.dense.host_values(dense_host)["grad_norm"][0][0]
    assert got == pytest.approx(float((full * 2).norm()), rel=1e-6), (rank, got)  # fp32 norms
    assert got > float(mine.grad.norm()) * 1.01  # not this rank's shard's norm


def test_flat_shards_are_summed_over_their_group(tmp_path):
    tiny.gloo_spawn(_flat_worker, tmp_path, str(tmp_path))


def test_flat_shard_group_finds_the_outermost_fsdp1_group(monkeypatch):
    class FakeFSDP1(nn.Module):
        def __init__(self, inner, group):
            super().__init__()
            self.inner, self.process_group = inner, group

    monkeypatch.setattr(dist, "_fsdp1_class", lambda: FakeFSDP1)
    model = FakeFSDP1(FakeFSDP1(nn.Linear(2, 2), "inner"), "outer")
    assert dist.flat_shard_group(model, world_size=2) == "outer"
    assert dist.flat_shard_group(model, world_size=1) is None  # one rank holds every parameter whole
    assert dist.flat_shard_group(nn.Linear(2, 2), world_size=2) is None  # DDP: whole replicas
