"""The tick report on synthetic runs written with the store: finished, clean, crashed, multi-rank, corrupt, resumed."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import tiny
from matplotlib.image import imread

from tick_lightning.reporting import ReportInputError, Thresholds, find_anomalies, load_run, main, report
from tick_lightning.reporting.synthetic import write_synthetic_run
from tick_lightning.store import load_ticks

SPIKE_LAYER = "encoder.layer.1.mlp.weight"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    kw = {"ticks": 16, "layers": 8, "renorm_every": 4}
    return {
        "anomalous": write_synthetic_run(base / "anomalous", spike=(60, SPIKE_LAYER, 1e3), nonfinite_step=100,
                                         amp=True, **kw),
        "clean": write_synthetic_run(base / "clean", **kw),
        "ddp": write_synthetic_run(base / "ddp", ranks=2, spike=(60, SPIKE_LAYER, 1e3), **kw),
        "crashed": write_synthetic_run(base / "crashed", crash=True, nonfinite_step=50, **kw),
    }


def _check_page(index, expect_figures: int) -> str:
    page = index.read_text()
    pngs = sorted(index.parent.glob("*.png"))
    assert len(pngs) == expect_figures
    for png in pngs:
        pixels = imread(png)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100, png
        assert pixels[..., :3].std() > 0.01, f"{png.name} is blank"
    embedded = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(embedded) == len(pngs)  # every figure embedded, nothing linked
    assert not re.search(r"src=['\"](?!data:)", page)
    return page


def test_planted_anomalies_found(runs, tmp_path):
    index = report(runs["anomalous"], tmp_path / "out")
    page = _check_page(index, expect_figures=6)  # loss/lr, 2 heatmaps, weights, norm inputs, renorm
    findings = find_anomalies(load_run(runs["anomalous"]))
    got = {(f.step, f.layer, f.kind) for f in findings}
    assert (60, SPIKE_LAYER, "exploding_grad") in got
    assert (100, "", "nonfinite_loss") in got
    assert (100, "", "amp_skipped") in got
    assert (100, "encoder.layer.1.mlp.bias", "nonfinite_grad") in got  # the synthetic run's last parameter
    assert len(findings) == 4, findings  # nothing else: the noise of a healthy run is not an anomaly
    spike = next(f for f in findings if f.kind == "exploding_grad")
    grad = load_ticks(runs["anomalous"]).query("state == 'grad' and stat == 'norm' and name == @SPIKE_LAYER")
    assert spike.value == grad.loc[grad.step == 60, "value"].item()
    assert spike.reference == pytest.approx(np.median(grad.loc[grad.step != 60, "value"]), rel=0.2)
    assert "exploding_grad" in page and SPIKE_LAYER in page
    md = (index.parent / "anomalies.md").read_text()
    assert "| 60 | `encoder.layer.1.mlp.weight` | exploding_grad |" in md
    csv = pd.read_csv(index.parent / "anomalies.csv")
    assert len(csv) == 4 and set(csv.kind) == {"exploding_grad", "nonfinite_loss", "amp_skipped", "nonfinite_grad"}


def test_clean_run_reports_nothing(runs, tmp_path):
    index = report(runs["clean"], tmp_path / "out")
    page = _check_page(index, expect_figures=6)
    assert "No anomalies found." in page
    assert "No anomalies found." in (index.parent / "anomalies.md").read_text()
    assert find_anomalies(load_run(runs["clean"])) == []


def test_cli_on_a_recipe_run_dir(tmp_path, capsys):
    # a recipe run directory holding ticks/ is accepted; output defaults to <ticks>/report
    parent = tmp_path / "recipe_run"
    write_synthetic_run(parent / "ticks", ticks=6, layers=2, renorm_every=0)
    assert main([str(parent), "--grad-factor", "100"]) == 0
    index = parent / "ticks" / "report" / "index.html"
    assert capsys.readouterr().out.strip() == str(index)
    _check_page(index, expect_figures=5)  # no re-normalization ran: no renorm figure
    from recipes.command import main as cli_main  # `tick-lightning report ...` goes through the same main

    assert cli_main(["report", str(parent / "ticks"), "--out", str(tmp_path / "via-cli")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "via-cli" / "index.html")


def test_multi_rank_merged_and_per_rank(runs, tmp_path):
    run = load_run(runs["ddp"])
    assert run.ranks == [0, 1]
    ref = load_ticks(runs["ddp"])
    loss = run.scalar("loss", "", "value", per_rank=True)
    ref_loss = ref.query("state == 'loss' and stat == 'value'").pivot(index="step", columns="rank", values="value")
    pd.testing.assert_frame_equal(loss, ref_loss, check_names=False, check_dtype=False)
    merged = run.scalar("loss", "", "value")
    np.testing.assert_allclose(merged.to_numpy(), ref_loss.mean(axis=1).to_numpy())
    assert {(f.step, f.layer, f.kind) for f in find_anomalies(run)} == {(60, SPIKE_LAYER, "exploding_grad")}
    page = _check_page(report(runs["ddp"], tmp_path / "merged"), expect_figures=6)
    assert "2 (0, 1)" in page
    one = load_run(runs["ddp"], rank=1)
    assert one.ranks == [1]
    np.testing.assert_array_equal(one.scalar("loss", "", "value").to_numpy(), ref_loss[1].to_numpy())


def test_crashed_run(runs, tmp_path):
    assert not list(runs["crashed"].glob("attempts/*/rank0/compact-*"))  # parts only, as a killed run leaves them
    run = load_run(runs["crashed"])
    assert not run.finished and len(run.steps) == 16
    page = _check_page(report(runs["crashed"], tmp_path / "out"), expect_figures=6)
    assert "did not finish" in page
    assert {f.kind for f in find_anomalies(run)} == {"nonfinite_loss", "nonfinite_grad"}
    assert load_run(runs["clean"]).finished


def test_corrupt_part_is_reported_and_the_rest_used(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run", ticks=10, layers=4, crash=True)
    parts = sorted(run_dir.glob("attempts/*/rank0/part-*.parquet"))
    parts[3].write_bytes(b"PAR1 this is not parquet")
    run = load_run(run_dir)
    assert len(run.problems) == 1 and parts[3].name in run.problems[0]
    assert run.steps.tolist() == [s for s in range(0, 100, 10) if s != 30]
    page = report(run_dir, tmp_path / "out").read_text()
    assert "Problems reading the records" in page and parts[3].name in page
    with pytest.warns(UserWarning, match=parts[3].name):  # the store's reader agrees on what is readable
        assert sorted(load_ticks(run_dir).step.unique()) == run.steps.tolist()


def test_no_records_and_bad_version_are_clear_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportInputError, match=r"No tick records in .*empty"):
        report(empty)
    assert main([str(empty)]) == 2
    assert "No tick records" in capsys.readouterr().err
    with pytest.raises(ReportInputError, match="does not exist"):
        report(tmp_path / "missing")
    run_dir = write_synthetic_run(tmp_path / "v99", ticks=3, layers=2)
    info = next(run_dir.glob("attempts/*/attempt.json"))
    info.write_text(json.dumps({**json.loads(info.read_text()), "schema_version": 99}))
    with pytest.raises(ReportInputError, match="schema version 99.*reads version 2"):
        report(run_dir)
    with pytest.raises(ValueError, match="rank=-1"):
        report(tmp_path / "v99", rank=-1)
    with pytest.raises(ValueError, match="grad_factor"):
        Thresholds(grad_factor=0.5)
    with pytest.raises(ValueError, match="ratio_low"):
        Thresholds(ratio_low=1.0, ratio_high=0.1)


def test_reader_matches_load_ticks_on_a_resumed_run(tmp_path):
    """The report's reader drops rows superseded by a resume exactly as the store's load_ticks does."""
    run_dir = tmp_path / "resumed"
    names = ["a.weight", "b.weight"]
    first = tiny.record(run_dir, [(step, [("loss", "", "value", 1.0), ("grad", names[0], "norm", step),
                                          ("grad", names[1], "norm", -step)]) for step in range(0, 100, 10)],
                        crash=True)  # crashed at step 90; the last checkpoint was written after step 49
    tiny.record(run_dir, [(step, [("loss", "", "value", 2.0), ("grad", names[0], "norm", step + 1),
                                  ("grad", names[1], "norm", step)]) for step in range(50, 150, 10)],
                resume=first[41])
    run = load_run(run_dir)
    ref = load_ticks(run_dir)
    got = run.wide("grad", "norm")
    want = ref.query("state == 'grad'").pivot(index="step", columns="name", values="value")[names]
    pd.testing.assert_frame_equal(got, want, check_names=False)
    assert run.scalar("loss", "", "value").to_dict() == {s: (1.0 if s < 50 else 2.0) for s in range(0, 150, 10)}


# ------------------------------------------------------------------------------------------------ whole or not at all
def _a_run(tmp_path):
    from tick_lightning.reporting.synthetic import write_synthetic_run

    return write_synthetic_run(str(tmp_path / "run"), ticks=4, layers=2)


def test_out_that_is_a_file_or_unwritable_is_one_line_and_touches_nothing(tmp_path, capsys):
    import os

    from tick_lightning.reporting import main

    run = _a_run(tmp_path)
    file = tmp_path / "taken"
    file.write_text("mine")
    assert main([str(run), "--out", str(file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"tick-lightning report: error: --out {str(file)!r} is a file; pass a directory for the report."
    assert file.read_text() == "mine"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # as root every directory is writable: nothing to check then
            assert main([str(run), "--out", str(locked / "report")]) == 2
            assert "cannot write the report" in capsys.readouterr().err
            assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_a_report_that_fails_midway_leaves_the_previous_one_whole(tmp_path, monkeypatch, capsys):
    """A full disk (or a kill) while figures are written: the previous report stays as it was, no half-written
    file (a 0-byte loss_lr.png) and no temporary directory is left."""
    import errno

    from tick_lightning.reporting import figures, main

    run = _a_run(tmp_path)
    out = tmp_path / "report"
    assert main([str(run), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = figures._save

    def full(fig, path):
        if path.name == "loss_lr.png":
            path.write_bytes(b"")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fig, path)

    monkeypatch.setattr(figures, "_save", full)
    assert main([str(run), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"cannot write the report to {str(out)!r}: No space left on device.")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "run"]


def test_a_report_into_a_directory_it_did_not_make_deletes_nothing(tmp_path):
    """A review found the staging swap removing whatever the output directory held: a user's file, or the tick
    records themselves when the report was written into the run directory. Only a directory a report made (its
    marker file) is replaced whole; into any other, the report's files are moved one by one, the rest stays."""
    import os

    from tick_lightning.reporting import main, report
    from tick_lightning.store import load_ticks

    run = _a_run(tmp_path)
    before = len(load_ticks(run))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main([str(run), "--out", str(mine)]) == 0
    assert (mine / "notes.txt").read_text() == "keep me" and (mine / "index.html").exists()
    report(run, out_dir=run)  # into the tick directory itself
    assert len(load_ticks(run)) == before
    old = os.getcwd()
    try:
        os.chdir(tmp_path / "mine")
        assert main([str(run), "--out", "."]) == 0  # a relative "." is a directory like any other
    finally:
        os.chdir(old)
    assert (mine / "notes.txt").read_text() == "keep me"
    fresh = tmp_path / "fresh"
    assert main([str(run), "--out", str(fresh)]) == 0
    assert (fresh / ".tick-report").exists() and oct(fresh.stat().st_mode & 0o777) != "0o700"
