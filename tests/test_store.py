import json

import numpy as np
import pandas as pd
import pytest

from tick_lightning.store import SCHEMA_VERSION, TickWriter, load_ticks, read_manifest, start_session


def write_ticks(run_dir, steps, rank=0, session=0, compact=True):
    w = TickWriter(run_dir, rank=rank, session=session)
    for step in steps:
        w.write(step, 0, ["loss", "grad"], ["", "w"], ["value", "norm"], np.array([step * 1.0, step + 0.5]))
    w.close(compact=compact)


def test_roundtrip_and_compaction(tmp_path):
    start_session(tmp_path, 0, 0, {"schedule": "every:1"})
    write_ticks(tmp_path, range(5))
    files = sorted(p.name for p in (tmp_path / "rank0").iterdir())
    assert files == ["compact-000-00000000-00000004.parquet"]
    df = load_ticks(tmp_path)
    assert list(df.columns) == ["step", "epoch", "rank", "session", "state", "name", "stat", "value"]
    loss = df[df.state == "loss"]
    assert loss.step.tolist() == [0, 1, 2, 3, 4] and loss.value.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert read_manifest(tmp_path)["schema_version"] == SCHEMA_VERSION


def test_crashed_run_parts_are_readable(tmp_path):
    write_ticks(tmp_path, range(3), compact=False)  # never compacted: as after a crash
    assert len(list((tmp_path / "rank0").glob("part-*.parquet"))) == 3
    assert sorted(load_ticks(tmp_path).step.unique()) == [0, 1, 2]


def test_crash_between_merge_and_delete_has_no_duplicates(tmp_path):
    write_ticks(tmp_path, range(3), compact=False)
    w = TickWriter(tmp_path, rank=0, session=0)
    w._first_seq = 0
    parts = sorted((tmp_path / "rank0").glob("part-*.parquet"))
    keep = [p.read_bytes() for p in parts]
    w.close(compact=True)
    for p, data in zip(parts, keep):  # the parts come back, as if the deletes never happened
        p.write_bytes(data)
    assert len(load_ticks(tmp_path)) == 6


def test_resume_supersedes_rows_after_the_checkpoint(tmp_path):
    start_session(tmp_path, 0, 0, {})
    write_ticks(tmp_path, range(6), session=0)  # ran to step 5, then crashed
    start_session(tmp_path, 1, 3, {})  # resumed from the checkpoint at step 3
    w = TickWriter(tmp_path, rank=0, session=1)
    for step in range(3, 8):
        w.write(step, 0, ["loss"], [""], ["value"], np.array([100.0 + step]))
    w.close()
    loss = load_ticks(tmp_path).query("state == 'loss'")
    assert loss.step.tolist() == list(range(8))
    assert loss.session.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert loss.value.tolist()[3:] == [103.0, 104.0, 105.0, 106.0, 107.0]
    assert len(load_ticks(tmp_path, all_sessions=True).query("state == 'loss'")) == 11


def test_multi_rank(tmp_path):
    write_ticks(tmp_path, range(2), rank=0)
    write_ticks(tmp_path, range(2), rank=1)
    df = load_ticks(tmp_path)
    assert sorted(df["rank"].unique()) == [0, 1]


def test_corrupt_part_is_reported_and_the_rest_used(tmp_path):
    write_ticks(tmp_path, range(3), compact=False)
    (tmp_path / "rank0" / "part-000-00000001.parquet").write_bytes(b"not parquet")
    errors = []
    with pytest.warns(UserWarning, match="part-000-00000001"):
        df = load_ticks(tmp_path, errors=errors)
    assert sorted(df.step.unique()) == [0, 2] and len(errors) == 1


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_ticks(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="No tick records"):
        load_ticks(tmp_path)
    write_ticks(tmp_path, [0])
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(ValueError, match="schema version 99"):
        load_ticks(tmp_path)


def test_recipe_run_dir_is_accepted(tmp_path):
    write_ticks(tmp_path / "ticks", [0, 1])
    assert isinstance(load_ticks(tmp_path), pd.DataFrame)
