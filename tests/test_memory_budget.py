"""The memory budget of a tick, measured: each state's extra memory is bounded by the largest parameter.

The promise (issue #19): at a tick, a state's temporaries and held copies are at most a few times the
largest parameter (fp32) plus a small per-parameter row, never a copy of the whole model. Measured with
``tests/instruments.LiveBytes`` (every storage allocated below ``tick_lightning`` code, from creation to
free) over a real Trainer fit on CPU with one tick, on a model with many same-size layers, so that
"the whole model" and "the largest parameter" are far apart (total / largest > 20).

One state holds more by definition: ``update`` keeps the selected trainable weights from before the
optimizer step until after it (its statistic is their difference). Its budget is one copy of the
*selection* plus the same temporaries -- on the device by default, in pinned host memory with
``update_on_host=True`` (a GPU test in test_callback.py checks that path); ``select=`` narrows it.

The statistics use their accelerator kernels (as in test_sync_budget.py); the sizes are what a GPU would
hold. benchmarks/sync_memory_budget.py prints the same measurement for BERT-base and ~1B-sized models on ``meta``.
"""

from __future__ import annotations

import pytest
import tiny
import torch
from instruments import LIBRARY, LiveBytes

from tick_lightning import TickCallback, stats

pytestmark = pytest.mark.usefixtures("one_thread")

#: allowed extra bytes = LARGEST_COPIES x the largest parameter in fp32 + PER_PARAMETER x the parameter count
LARGEST_COPIES = 4
PER_PARAMETER = 256


@pytest.fixture(autouse=True)
def accelerator_kernels(monkeypatch):
    monkeypatch.setattr(stats, "_host_rows", stats._device_rows)


def deep_bert():
    return tiny.tiny_bert(num_hidden_layers=8)


def measure(tmp_path, state: str, select=None, flight=False) -> tuple[int, int, int, int]:
    """(peak extra bytes, largest parameter fp32 bytes, parameter count, total parameter fp32 bytes).

    The flight recorder (on by default) is off here: its ring is a stated, separate budget
    (``test_the_flight_recorder_holds_its_stated_ring_and_little_more``)."""
    model = tiny.HFClassifier(deep_bert())
    params = list(model.parameters())
    largest = max(p.numel() for p in params) * 4
    total = sum(p.numel() for p in params) * 4
    callback = TickCallback(ticks="2", states=[state], dirpath=tmp_path / "ticks", log_to_loggers=False,
                            select=select, flight=flight)
    trainer = tiny.trainer(tmp_path, max_steps=3, callbacks=[callback])
    with LiveBytes(scope=LIBRARY) as mem:
        trainer.fit(model, tiny.loader(tiny.token_dataset(24)))
    return mem.peak, largest, len(params), total


def test_the_model_is_deep_enough_to_tell_the_bounds_apart(tmp_path):
    model = deep_bert()
    sizes = [p.numel() * 4 for p in model.parameters()]
    bound = LARGEST_COPIES * max(sizes) + PER_PARAMETER * len(sizes)
    assert sum(sizes) > 20 * max(sizes) and sum(sizes) > 1.5 * bound


@pytest.mark.parametrize("state", ["loss", "lr", "weight", "grad", "norm_input", "time", "memory"])
def test_tick_memory_is_bounded_by_the_largest_parameter(tmp_path, state):
    peak, largest, count, total = measure(tmp_path, state)
    bound = LARGEST_COPIES * largest + PER_PARAMETER * count
    assert peak <= bound, (f"state {state!r} holds {peak} extra bytes at a tick: more than {LARGEST_COPIES} x the "
                           f"largest parameter ({largest} B) + {PER_PARAMETER} B x {count} parameters = {bound} B "
                           f"(the whole model is {total} B)")


def test_update_holds_one_copy_of_its_selection_and_no_more(tmp_path):
    peak, largest, count, total = measure(tmp_path, "update")
    temporaries = LARGEST_COPIES * largest + PER_PARAMETER * count
    assert total <= peak <= total + temporaries  # the weights before the step, once (the old code held 2x)
    narrow, *_ = measure(tmp_path / "narrow", "update", select="model.classifier.*")
    classifier = sum(p.numel() * 4 for n, p in deep_bert().named_parameters() if n.startswith("classifier."))
    assert narrow <= classifier + temporaries < total / 2  # the copy follows select=, not the model


def test_the_instrument_sees_a_model_copy(tmp_path):
    """What the bound must catch: a copy of every parameter held at once (as the ``update`` state did)."""
    model = deep_bert()
    with LiveBytes() as mem:
        copies = [p.detach().clone() for p in model.parameters()]
    assert mem.peak == sum(p.numel() * 4 for p in model.parameters()) and len(copies) > 1
    del copies
    assert mem.live == 0
    with torch.no_grad(), LiveBytes() as mem:
        stats.tensor_stats(list(model.parameters()))
    largest = max(p.numel() for p in model.parameters()) * 4
    assert mem.peak <= LARGEST_COPIES * largest + PER_PARAMETER * len(list(model.parameters()))


def test_the_flight_recorder_holds_its_stated_ring_and_little_more(tmp_path):
    """The ring is ``flight_window x parameters x 8`` bytes for the whole fit (docs/records.md); a dump
    takes a copy of the rows it writes and their reduced sum: at most 3 rings over the tick budget."""
    peak, largest, count, _ = measure(tmp_path, "loss", flight=True)
    ring = 128 * count * 8
    off, *_ = measure(tmp_path / "off", "loss", flight=False)
    assert ring <= peak - off <= 3 * ring, (peak, off, ring)

