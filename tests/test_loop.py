"""``tick_lightning.loop.TickLoop``: the same records from a plain PyTorch loop as from Lightning.

The reference is the same fit through Lightning with ``TickCallback`` (tests/test_hf_trainer.py's setup): the same
tiny model, batches, AdamW without weight decay, accumulation and clipping; every record must agree to 1e-6.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import tiny
import torch

from tick_lightning import TickCallback, load_dense, load_flight, load_ticks
from tick_lightning.loop import TickLoop

STEPS, BATCH = 8, 4
TICK = dict(ticks="every:2", states=["loss", "lr", "grad", "weight", "update"], log_to_loggers=False)


class Module(tiny.HFClassifier):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)


def lightning_fit(tmp_path, model, data, acc, clip):
    cb = TickCallback(dirpath=tmp_path / "pl", **TICK)
    trainer = tiny.trainer(tmp_path, callbacks=[cb], max_steps=STEPS, accumulate_grad_batches=acc,
                           gradient_clip_val=clip or None)
    trainer.fit(Module(model), tiny.loader(data, batch_size=BATCH))
    return tmp_path / "pl"


def loop_fit(out, model, data, acc, clip, steps=STEPS, state=None, stop_at=None, saved=None):
    """The documented loop (docs/getting-started.md), with accumulation and clipping; ``stop_at``: return after that
    many optimizer steps with ``saved[step] = tick.state_dict()`` at each step (a checkpoint's), as if killed."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    batches = list(tiny.loader(data, batch_size=BATCH))
    tick = TickLoop(model, optimizer, dirpath=out, total_steps=steps, accumulate=acc,
                    state=state["tick"] if state else None, **TICK)
    with tick:
        for i in range(tick.step * acc, steps * acc):
            ids, mask, labels = batches[i]
            tick.batch_begin()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss / acc
            loss.backward()
            if (i + 1) % acc == 0:
                tick.gradients_ready()
                if clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
                optimizer.zero_grad()
            tick.batch_end(loss.detach())
            if saved is not None and (i + 1) % acc == 0:
                saved[tick.step] = {"tick": tick.state_dict(), "model": copy.deepcopy(model.state_dict()),
                                    "optimizer": copy.deepcopy(optimizer.state_dict())}
            if stop_at is not None and tick.step == stop_at:
                tick._closed = True  # abandoned, not closed: as if the process died here (its writes are its last)
                return tick.dirpath
    return tick.dirpath


def rows(path, prefix=""):
    cols = ["step", "state", "name", "stat"]
    df = load_ticks(path)
    return df.assign(name=df.name.str.removeprefix(prefix)).set_index(cols).value.sort_index()


@pytest.mark.parametrize("acc, clip", [(1, 0.0), (2, 0.05)], ids=["plain", "accumulate+clip"])
def test_the_loop_records_what_lightning_records_for_the_same_fit(tmp_path, acc, clip):
    model, data = tiny.tiny_bert(), tiny.token_dataset(BATCH * acc * STEPS)
    pl_dir = lightning_fit(tmp_path, copy.deepcopy(model), data, acc, clip)
    loop_dir = loop_fit(tmp_path / "loop", copy.deepcopy(model), data, acc, clip)
    pl, loop = rows(pl_dir, "model."), rows(loop_dir)
    assert set(pl.index.get_level_values("step")) == {0, 2, 4, 6, 7}
    assert pl.index.equals(loop.index), (pl.index.difference(loop.index), loop.index.difference(pl.index))
    np.testing.assert_allclose(loop.to_numpy(), pl.to_numpy(), rtol=1e-6, atol=1e-9)
    dense_pl, dense_loop = load_dense(pl_dir), load_dense(loop_dir)
    assert list(dense_loop.index) == list(range(STEPS))
    np.testing.assert_allclose(dense_loop[["loss", "grad_norm"]], dense_pl[["loss", "grad_norm"]], rtol=1e-6)
    if clip:
        assert (dense_loop["grad_norm"] > clip).all()  # pre-clip
    flight_pl, flight_loop = load_flight(pl_dir), load_flight(loop_dir)
    flight_pl.columns = [c.removeprefix("model.") for c in flight_pl.columns]
    np.testing.assert_allclose(flight_loop[flight_pl.columns].to_numpy(), flight_pl.to_numpy(), rtol=1e-6)


def test_a_resume_from_the_loops_state_records_every_tick_once_as_the_uninterrupted_fit(tmp_path):
    """Abandoned after step 5 (as if killed: never closed), resumed from the state saved after step 4 with the model and
    optimizer of that checkpoint: every tick once, equal to the uninterrupted loop's; what the abandoned attempt wrote
    after its checkpoint (tick 4, the dense rows of steps 4-5) superseded."""
    model, data = tiny.tiny_bert(), tiny.token_dataset(BATCH * STEPS)
    whole = loop_fit(tmp_path / "whole", copy.deepcopy(model), data, 1, 0.0)
    saved: dict = {}
    loop_fit(tmp_path / "cut", copy.deepcopy(model), data, 1, 0.0, stop_at=5, saved=saved)
    cut = loop_fit(tmp_path / "cut", copy.deepcopy(model), data, 1, 0.0, state=saved[4])
    a, b = rows(whole), rows(cut)
    assert b.index.equals(a.index) and sorted(set(b.index.get_level_values("step"))) == [0, 2, 4, 6, 7]
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-6, atol=1e-9)
    assert list(load_dense(cut).index) == list(range(STEPS))
    old = load_ticks(cut, superseded=True)
    assert set(old[old.superseded].step) == {4}  # the abandoned attempt's tick after its checkpoint, not read twice


def test_an_exception_in_the_loop_dumps_the_flight_ring_with_its_event(tmp_path):
    model = tiny.tiny_bert()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ids, mask, labels = next(iter(tiny.loader(tiny.token_dataset(8))))
    with pytest.raises(RuntimeError, match="boom"), TickLoop(model, optimizer, dirpath=tmp_path / "t", **TICK) as tick:
        for step in range(4):
            tick.batch_begin()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            if step == 3:
                raise RuntimeError("boom")
            loss.backward()
            tick.gradients_ready()
            optimizer.step()
            optimizer.zero_grad()
            tick.batch_end(loss.detach())
    events = load_flight(tmp_path / "t", "events")
    assert list(zip(events.trigger, events.step)) == [("exception", 3)]
    assert sorted(load_flight(tmp_path / "t").index) == [0, 1, 2]


def test_bad_loop_arguments_fail_in_one_line_naming_the_value():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"^TickLoop\(accumulate=0\): must be an integer >= 1"):
        TickLoop(model, optimizer, accumulate=0)
    with pytest.raises(ValueError, match=r"^TickLoop\(total_steps=-5\): must be"):
        TickLoop(model, optimizer, total_steps=-5)
