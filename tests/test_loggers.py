"""log_tick through real loggers: a TensorBoard event file read back, a CSV file read back."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing import event_accumulator

from tick_lightning.loggers import log_tick
from tick_lightning.records import Block

NAMES = ("enc.0.weight", "enc.0.bias", "enc.1.weight", "head.weight")


def tick_blocks(step: int) -> list[Block]:
    rng = np.random.default_rng(step)
    grad = np.c_[10.0 ** rng.uniform(-4, 0, len(NAMES)), np.zeros(len(NAMES))]
    grad[2, 0] = np.inf  # one non-finite layer: counted, not drawn
    grad = np.r_[grad, [[1.0, 0.0]]]  # the global row (name "") is not a layer
    update = np.c_[np.ones(len(NAMES)), 10.0 ** rng.uniform(-5, -2, len(NAMES))]
    return [Block("loss", ("",), ("value",), np.array([[0.7]])),
            Block("grad", (*NAMES, ""), ("norm", "nonfinite"), grad),
            Block("update", NAMES, ("norm", "ratio"), update)]


def read_events(log_dir):
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={event_accumulator.HISTOGRAMS: 0,
                                                                          event_accumulator.SCALARS: 0})
    acc.Reload()
    return acc


def test_tensorboard_histograms_and_grouped_scalars(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    for step in (0, 10):
        log_tick([logger], step, tick_blocks(step), select=["enc.0.*"])
    logger.experiment.flush()
    acc = read_events(logger.log_dir)
    assert set(acc.Tags()["histograms"]) == {"ticks/layers/grad_norm", "ticks/layers/update_ratio"}
    for step, event in zip((0, 10), acc.Histograms("ticks/layers/grad_norm")):
        grad = tick_blocks(step)[1].values[: len(NAMES), 0]
        want = np.log10(grad[np.isfinite(grad)])
        h = event.histogram_value
        assert event.step == step and h.num == 3
        np.testing.assert_allclose([h.min, h.max, h.sum], [want.min(), want.max(), want.sum()], rtol=1e-6)
    ratio = acc.Histograms("ticks/layers/update_ratio")[1].histogram_value
    np.testing.assert_allclose(ratio.sum, np.log10(tick_blocks(10)[2].values[:, 1]).sum(), rtol=1e-6)
    scalars = set(acc.Tags()["scalars"])
    assert {"ticks/grad_norm/enc.0.weight", "ticks/grad_norm/enc.0.bias", "ticks/update_ratio/enc.0.weight",
            "ticks/layers/grad_norm_nonfinite", "ticks/layers/grad_norm_median"} <= scalars
    assert not any("enc.1" in t or "head" in t for t in scalars)  # not selected
    (nonfinite,) = [e.value for e in acc.Scalars("ticks/layers/grad_norm_nonfinite") if e.step == 10]
    assert nonfinite == 1.0
    got = [e.value for e in acc.Scalars("ticks/grad_norm/enc.0.weight")]
    np.testing.assert_allclose(got, [tick_blocks(s)[1].values[0, 0] for s in (0, 10)], rtol=1e-6)


def test_csv_gets_scalars_only(tmp_path):
    logger = CSVLogger(tmp_path, name="csv", version=0)
    sent = log_tick([logger], 5, tick_blocks(5), select="head.*")
    logger.save()
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) - {"step"} == set(sent)
    assert float(rows[0]["ticks/update_ratio/head.weight"]) == pytest.approx(tick_blocks(5)[2].values[3, 1])
    assert "ticks/layers/grad_norm" not in rows[0]  # the histogram tag itself is TensorBoard's


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="matches 4 layers, more than max_layers=2"):
        log_tick([], 0, tick_blocks(0), select="*", max_layers=2)
    with pytest.raises(ValueError, match="step=-1"):
        log_tick([], -1, [])


def test_tick_callback_in_a_trainer_sends_per_layer_data_to_tensorboard(tmp_path):
    """A real fit: the event file holds, per tick, the histogram over layers of the recorded gradient norms,
    the selected layer's grouped scalars and the global tags, all equal to the tick records."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import tiny

    from tick_lightning import TickCallback, load_ticks

    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    cb = TickCallback(ticks="0,2", states=["loss", "grad", "update", "weight"], dirpath=tmp_path / "ticks",
                      log_select="model.classifier.*")
    trainer = tiny.trainer(tmp_path, callbacks=[cb], max_steps=3, logger=logger)
    trainer.fit(tiny.HFClassifier(tiny.tiny_bert()), tiny.loader(tiny.token_dataset(24)))
    logger.experiment.flush()
    df = load_ticks(tmp_path / "ticks")
    grads = df[(df.state == "grad") & (df.stat == "norm") & (df.name != "")]
    acc = read_events(logger.log_dir)
    assert {"ticks/layers/grad_norm", "ticks/layers/update_ratio", "ticks/layers/weight_norm"} <= set(
        acc.Tags()["histograms"])
    events = acc.Histograms("ticks/layers/grad_norm")
    assert [e.step for e in events] == [0, 2]
    for event in events:
        want = np.log10(grads[grads.step == event.step].value.to_numpy())
        h = event.histogram_value
        assert h.num == len(want) == grads.name.nunique()
        np.testing.assert_allclose([h.min, h.max, h.sum], [want.min(), want.max(), want.sum()], rtol=1e-5)
    got = {e.step: e.value for e in acc.Scalars("ticks/grad_norm/model.classifier.weight")}
    rows = grads[grads.name == "model.classifier.weight"]
    assert got == pytest.approx(dict(zip(rows.step, rows.value)), rel=1e-5)
    loss = df[(df.state == "loss") & (df.stat == "value")]
    assert {e.step: e.value for e in acc.Scalars("ticks/loss/value")} == pytest.approx(
        dict(zip(loss.step, loss.value)), rel=1e-5)
    assert not any("grad_norm/model.bert" in t for t in acc.Tags()["scalars"])  # not selected


def read_wandb_history(run_file) -> list[dict]:
    """The history rows of an offline run's ``run-*.wandb`` file, each ``{key: json value}``.

    wandb writes the file from its Go core, and the installed version (0.31) ships no Python reader (the old
    ``wandb.sdk.internal.datastore.DataStore`` is gone), so this reads the format itself: a 7-byte header
    (``:W&B``, magic, version) then the LevelDB log format (32 KiB blocks of records: crc32 uint32,
    length uint16, type uint8 FULL/FIRST/MIDDLE/LAST, data), each whole record a ``Record`` protobuf.
    """
    import json
    import struct
    import time
    import zlib

    from wandb.proto import wandb_internal_pb2

    # the Go core is another process and may still be appending when wandb.finish() returns (a fresh-clone
    # suite once read a half-written record): read once the file has stopped growing
    size, deadline = -1, time.monotonic() + 30
    while time.monotonic() < deadline and os.path.getsize(run_file) != size:
        size = os.path.getsize(run_file)
        time.sleep(0.5)
    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B", data[:7]
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's trailer: zeros
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF == crc, f"bad checksum at {pos}"
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                row: dict = {}
                for item in record.history.item:  # a histogram arrives flattened: nested_key (tag, "_type"), ...
                    *parents, leaf = list(item.nested_key) or [item.key]
                    node = row
                    for key in parents:
                        node = node.setdefault(key, {})
                    node[leaf] = json.loads(item.value_json)
                rows.append(row)
    return rows


def test_tick_callback_in_a_trainer_sends_histograms_and_grouped_scalars_to_wandb(tmp_path, monkeypatch):
    """A real fit with an offline WandbLogger: the run file holds, per tick, one row with the histogram over
    layers of the recorded gradient norms (and update ratios, weight norms) and the selected layer's grouped
    scalars, at trainer/global_step = the tick's step, all equal to the tick records (load_ticks)."""
    pytest.importorskip("wandb")
    import sys
    from pathlib import Path

    from lightning.pytorch.loggers import WandbLogger

    sys.path.insert(0, str(Path(__file__).parent))
    import tiny

    from tick_lightning import TickCallback, load_ticks

    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path),
                       "WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_CONFIG_DIR": str(tmp_path / "config"),
                       "WANDB_DATA_DIR": str(tmp_path / "data"), "WANDB_CONSOLE": "off",
                       "WANDB_DISABLE_GIT": "true", "WANDB_X_DISABLE_STATS": "true"}.items():
        monkeypatch.setenv(var, value)
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="tick-test")
    cb = TickCallback(ticks="0,2", states=["loss", "grad", "update", "weight"], dirpath=tmp_path / "ticks",
                      log_to_loggers=True, log_select="*classifier*")
    trainer = tiny.trainer(tmp_path, callbacks=[cb], max_steps=3, logger=logger)
    try:
        trainer.fit(tiny.HFClassifier(tiny.tiny_bert()), tiny.loader(tiny.token_dataset(24)))
    finally:
        import wandb

        wandb.finish()
    (run_file,) = Path(tmp_path).glob("wandb/offline-run-*/run-*.wandb")
    rows = [r for r in read_wandb_history(run_file) if "ticks/layers/grad_norm" in r]
    assert [r["trainer/global_step"] for r in rows] == [0, 2]  # one row per tick, in order

    df = load_ticks(tmp_path / "ticks")
    layers = df[df.name != ""]
    for row in rows:
        step = row["trainer/global_step"]
        for series, (state, stat) in (("grad_norm", ("grad", "norm")), ("update_ratio", ("update", "ratio")),
                                      ("weight_norm", ("weight", "norm"))):
            values = layers[(layers.state == state) & (layers.stat == stat) & (layers.step == step)].value.to_numpy()
            want = np.log10(values[np.isfinite(values) & (values > 0)])  # e.g. zero-initialized biases: ratio inf
            hist = row[f"ticks/layers/{series}"]
            assert hist["_type"] == "histogram" and sum(hist["values"]) == len(want) > 4, series
            np.testing.assert_allclose([hist["bins"][0], hist["bins"][-1]], [want.min(), want.max()], rtol=1e-5)
            assert np.array_equal(hist["values"], np.histogram(want, bins=64)[0])
        grads = layers[(layers.state == "grad") & (layers.stat == "norm") & (layers.step == step)]
        ratios = layers[(layers.state == "update") & (layers.stat == "ratio") & (layers.step == step)]
        selected = sorted(n for n in grads.name.unique() if "classifier" in n)
        assert selected == ["model.classifier.bias", "model.classifier.weight"]
        for name in selected:
            assert row[f"ticks/grad_norm/{name}"] == pytest.approx(grads[grads.name == name].value.item(), rel=1e-6)
            assert row[f"ticks/update_ratio/{name}"] == pytest.approx(ratios[ratios.name == name].value.item(),
                                                                      rel=1e-6)
        assert not any(k.startswith("ticks/grad_norm/model.bert") for k in row)  # not selected
