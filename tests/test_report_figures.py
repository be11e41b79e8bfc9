"""The report's figures: a view with no data says why, zero-initialised biases are drawn, dense curves."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
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


# ------------------------------------------------------------------------------------------------ issue 36: readable
def _drawn(monkeypatch):
    """The figures each report function saves, kept open for inspection (name -> Figure)."""
    from tick_lightning.reporting import figures

    kept = {}
    def keep(fig, path):
        kept[path.name] = fig
        fig.savefig(path, dpi=40)  # drawn (the labels exist), left open for the test
        return path

    monkeypatch.setattr(figures, "_save", keep)
    return kept


@pytest.mark.parametrize("layers", [2, 24, 291, 723])
def test_every_heatmap_row_is_labelled_at_any_model_size(tmp_path, monkeypatch, layers):
    """105 rows labelled every other one read as the row beside it, and 723 rows cannot be read at all: up to 64
    tensors every row carries its own label (without the common prefix); beyond, rows by module kind and by
    block, each labelled."""
    from tick_lightning.reporting import figures, load_run
    from tick_lightning.reporting.synthetic import write_synthetic_run

    run = load_run(write_synthetic_run(tmp_path / "run", ticks=6, layers=layers))
    kept = _drawn(monkeypatch)
    figures.grad_heatmap(run, tmp_path / "g.png")
    fig = kept["g.png"]
    axes = [ax for ax in fig.axes if ax.get_yticklabels() and ax.images]
    rows = [ax.images[0].get_array().shape[0] for ax in axes]
    labels = [[t.get_text() for t in ax.get_yticklabels()] for ax in axes]
    assert all(len(lab) == n and all(lab) for lab, n in zip(labels, rows))  # every row, its own label
    if layers <= 64:
        assert rows == [layers] and not any(lab.startswith("encoder.layer.") for lab in labels[0])  # prefix off
    else:
        assert len(axes) == 2 and sum(rows) < 200  # kinds, then blocks
        assert all("(" in lab for lab in labels[0] + labels[1])  # each row says how many tensors it stands for


def test_the_weight_norm_scale_comes_from_the_data(tmp_path, monkeypatch):
    """A fine-tune moves weight norms by ~1e-4 of themselves; a colour scale fixed at +-0.5 decades drew every cell
    the same grey."""
    import pandas as pd

    from tick_lightning.reporting import figures

    steps = [0, 10, 20]
    w = pd.DataFrame({f"encoder.layer.{i}.w": [1.0, 1.0 + 1e-4 * (i + 1), 1.0 + 2e-4 * (i + 1)] for i in range(20)},
                     index=pd.Index(steps, name="step"))

    class Run:
        def wide(self, state, stat):
            return w

        def has(self, *a):
            return False

    kept = _drawn(monkeypatch)
    figures.weight_norms(Run(), tmp_path / "w.png")
    image = kept["w.png"].axes[0].images[0]
    lo, hi = image.get_clim()
    assert 0.2 < hi < 0.5 and lo == -hi  # up to 0.4 % here: the data's own range, in percent
    assert "change since step 0 (%)" in kept["w.png"]._suptitle.get_text()


def test_recorded_histograms_are_drawn(tmp_path):
    from tick_lightning import TickCallback
    from tick_lightning.reporting import report

    cb = TickCallback(ticks="0,every:4", states=["loss", "grad", "grad_hist"], dirpath=tmp_path / "ticks")
    tiny.trainer(tmp_path, callbacks=[cb], max_steps=9).fit(tiny.HFClassifier(tiny.tiny_bert()),
                                                             tiny.loader(tiny.token_dataset(72)))
    index = report(tmp_path / "ticks")
    assert (index.parent / "histograms.png").stat().st_size > 10_000
    assert "histograms.png" in index.read_text()
