"""The report's figures: a view with no data says why, zero-initialised biases are drawn, dense curves."""

from __future__ import annotations

import numpy as np
import pandas as pd
import tiny

from tick_lightning.reporting import load_run, report
from tick_lightning.reporting.figures import all_figures, relative_to_first, why_empty
from tick_lightning.reporting.synthetic import write_synthetic_run


def test_relative_to_first_keeps_zero_initialised_rows():
    w = pd.DataFrame({"w": [2.0, 3.0, 4.0], "b": [0.0, 0.25, 0.5], "z": [0.0, 0.0, 0.0]})
    rel = relative_to_first(w)
    np.testing.assert_allclose(rel["w"], [1.0, 1.5, 2.0])
    np.testing.assert_allclose(rel["b"], [0.0, 1.0, 2.0])  # was all NaN (blank row) dividing by tick 0
    assert rel["z"].isna().all()  # never positive: nothing to be relative to


def _run_without(tmp_path, states, norm_layers, skipped_every_tick=False):
    """A run written like TickCallback's, with only ``states`` and a manifest saying so."""
    manifest = {"schedule": "every:1", "states": states, "norm_layers": norm_layers, "precision": "16-mixed",
                "model_class": "m.Model", "parameters": {"w": [4, 4]}}
    ratio = np.nan if skipped_every_tick else 1e-3
    tiny.record(tmp_path, [(step, [("loss", "", "value", 0.5), ("grad", "w", "norm", 1.0), ("weight", "w", "norm", 2.0),
                                   ("update", "w", "ratio", ratio), ("amp", "", "skipped", float(skipped_every_tick))])
                           for step in range(6)], manifest=manifest)
    return load_run(tmp_path)


def test_empty_views_say_why(tmp_path):
    run = _run_without(tmp_path / "a", ["loss", "grad", "weight", "update", "amp"], [])
    assert "'norm_input' is not among this run's states" in why_empty(run, "norm_input", "rms")
    run = _run_without(tmp_path / "b", ["loss", "grad", "weight", "update", "amp", "norm_input"], ["ln"])
    assert "forward hooks never fired" in why_empty(run, "norm_input", "rms")
    assert "torch.compile" in why_empty(run, "norm_input", "rms")
    run = _run_without(tmp_path / "c", ["loss", "grad", "weight", "update", "amp", "norm_input"], [])
    assert "no normalization layer was found" in why_empty(run, "norm_input", "rms")
    run = _run_without(tmp_path / "d", ["loss", "grad", "weight", "update", "amp"], [], skipped_every_tick=True)
    reason = why_empty(run, "update", "ratio")
    assert "every value is NaN/inf" in reason and "skipped 6 of 6" in reason and "16-mixed" in reason
    figures = dict((p.name, caption) for p, caption in all_figures(run, tmp_path))
    assert figures["update_ratio_heatmap.png"] == reason  # a placeholder in place, captioned with the reason
    assert "norm_inputs.png" in figures and "renorm.png" not in figures  # optional view left out
    page = report(tmp_path / "d").read_text()
    assert "skipped 6 of 6" in page


def test_dense_curves_and_spike_marks(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "r", ticks=10, layers=4, dense=True, loss_spike=(33, 1e3))
    page = report(run_dir)
    md = (page.parent / "anomalies.md").read_text()
    assert "loss_spike" in md and "| 33 |" in md
    assert (page.parent / "loss_lr.png").stat().st_size > 0
