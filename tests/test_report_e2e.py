"""End to end: a tiny Trainer run with TickCallback, then the report on its tick directory."""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("tick_lightning.callback")

import tiny

from tick_lightning.callback import TickCallback
from tick_lightning.reporting import find_anomalies, load_run, report
from tick_lightning.store import load_ticks


def test_report_of_a_real_tiny_run(tmp_path):
    ticks = TickCallback(ticks="every:2", dirpath=tmp_path / "ticks")
    trainer = tiny.trainer(tmp_path, max_steps=8, callbacks=[ticks])
    trainer.fit(tiny.HFClassifier(tiny.tiny_bert()), tiny.loader(tiny.token_dataset(32)))
    index = report(tmp_path / "ticks")
    run = load_run(tmp_path / "ticks")
    assert run.finished and run.steps.tolist() == [0, 2, 4, 6, 7]  # 7: the last step
    # the report's reader and the store's reader see the same gradient norms
    ref = load_ticks(tmp_path / "ticks").query("state == 'grad' and stat == 'norm' and name != ''")
    want = ref.pivot(index="step", columns="name", values="value")
    got = run.wide("grad", "norm")
    assert set(got.columns) == set(want.columns) and len(got.columns) > 10
    np.testing.assert_array_equal(got[want.columns].to_numpy(), want.to_numpy())
    page = index.read_text()
    # loss/lr, grad + update heatmaps, weights, norm inputs (BERT's LayerNorms); no renorm ran
    assert sorted(p.name for p in index.parent.glob("*.png")) == [
        "grad_norm_heatmap.png", "loss_lr.png", "norm_inputs.png", "update_ratio_heatmap.png", "weight_norms.png"]
    assert len(re.findall("data:image/png;base64,", page)) == 5
    # too few ticks for a history verdict, healthy updates: nothing to flag on a normal run
    kinds = {f.kind for f in find_anomalies(run)}
    assert not kinds & {"nonfinite_loss", "nonfinite_grad", "exploding_grad", "vanishing_grad"}, kinds
