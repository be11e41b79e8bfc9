"""The store on its own: attempts, lineages, damage, concurrent writers. Trainer-level crash tests are in
test_records_integrity.py."""

import json
import os
import subprocess
import sys

import pytest
import tiny

from tick_lightning.records import Block
from tick_lightning.store import Recorder, TickRecordsError, TickWriter, list_runs, load_ticks, read_manifest
from tick_lightning.store.layout import SCHEMA_VERSION, attempt_dir, rank_dir


def fit(d, steps, *, resume=None, rank=0, crash=False, value=0.0):
    """One simulated fit (a loss and two gradient rows per step); returns its checkpoint states."""
    return tiny.record(d, [(step, [("loss", "", "value", value + step), ("grad", "w", "norm", step + 0.5),
                                   ("grad", "b", "norm", step + 0.25)]) for step in steps],
                       resume=resume, crash=crash, rank=rank, manifest={"schedule": "every:1"})


def losses(df):
    return df[df.state == "loss"][["step", "value"]].values.tolist()


def test_roundtrip_compaction_and_columns(tmp_path):
    fit(tmp_path, range(5))
    (attempt,) = list_runs(tmp_path).attempt
    assert sorted(p.name for p in rank_dir(tmp_path, attempt, 0).iterdir()) == ["compact-00000000-00000004.parquet"]
    df = load_ticks(tmp_path)
    assert list(df.columns) == ["step", "epoch", "rank", "run", "attempt", "state", "name", "stat", "value"]
    assert losses(df) == [[s, float(s)] for s in range(5)]
    assert df[df.state == "grad"].name.tolist()[:2] == ["w", "b"]
    manifest = read_manifest(tmp_path)
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["schedule"] == "every:1"
    assert manifest["attempt"] == attempt == manifest["run"]


def test_crashed_attempt_parts_are_readable(tmp_path):
    fit(tmp_path, range(3), crash=True)
    (attempt,) = list_runs(tmp_path).attempt
    assert len(list(rank_dir(tmp_path, attempt, 0).glob("part-*.parquet"))) == 3
    assert sorted(load_ticks(tmp_path).step.unique()) == [0, 1, 2]


def test_crash_between_merge_and_delete_has_no_duplicates(tmp_path):
    fit(tmp_path, range(3), crash=True)
    (attempt,) = list_runs(tmp_path).attempt
    folder = rank_dir(tmp_path, attempt, 0)
    parts = {p: p.read_bytes() for p in folder.glob("part-*.parquet")}
    writer = TickWriter(folder, run=attempt, attempt=attempt)
    writer._first_seq = 0
    writer.close(compact=True)
    for p, data in parts.items():  # the parts come back, as if the deletes never happened
        p.write_bytes(data)
    assert losses(load_ticks(tmp_path)) == [[0, 0.0], [1, 1.0], [2, 2.0]]


def test_resume_supersedes_the_rows_after_its_checkpoint(tmp_path):
    ckpts = fit(tmp_path, range(6), crash=True)  # ran to step 5, crashed; checkpoint at global_step 3
    fit(tmp_path, range(3, 8), resume=ckpts[3], value=100.0)
    df = load_ticks(tmp_path)
    assert losses(df) == [[0, 0.0], [1, 1.0], [2, 2.0]] + [[s, 100.0 + s] for s in range(3, 8)]
    assert df.run.nunique() == 1 and df.attempt.nunique() == 2
    everything = load_ticks(tmp_path, superseded=True)
    assert (everything.state == "loss").sum() == 11
    assert sorted(everything[everything.superseded & (everything.state == "loss")].step) == [3, 4, 5]


def test_two_resumes_from_one_checkpoint_count_each_step_once(tmp_path):
    ckpts = fit(tmp_path, range(0, 24), crash=True)  # crash at 23, checkpoint at 20
    fit(tmp_path, range(20, 28), resume=ckpts[20], crash=True, value=100.0)  # resumed, crashed at 27
    fit(tmp_path, range(20, 30), resume=ckpts[20], value=200.0)  # resumed from the same checkpoint again
    df = load_ticks(tmp_path)
    assert [s for s, _ in losses(df)] == list(range(30))
    assert all(v == 200.0 + s for s, v in losses(df) if s >= 20)  # the newest attempt wins, the abandoned one is out
    runs = list_runs(tmp_path)
    assert runs.run.nunique() == 1 and runs.in_lineage.tolist() == [True, False, True]
    assert runs.resumed_from_step.tolist()[1:] == [20, 20]


def test_a_resume_of_a_resume_keeps_the_whole_chain(tmp_path):
    first = fit(tmp_path, range(0, 12), crash=True)
    second = fit(tmp_path, range(10, 22), resume=first[10], crash=True, value=100.0)
    fit(tmp_path, range(20, 25), resume=second[20], value=200.0)
    values = dict(losses(load_ticks(tmp_path)))
    assert sorted(values) == list(range(25))
    assert [values[9], values[10], values[19], values[20]] == [9.0, 110.0, 119.0, 220.0]


def test_a_fresh_fit_into_a_used_directory_is_a_new_run_kept_apart(tmp_path):
    fit(tmp_path, range(20))
    with pytest.warns(UserWarning, match="already holds tick records of run"):
        fit(tmp_path, range(30), value=1000.0)
    latest = load_ticks(tmp_path)
    assert losses(latest) == [[s, 1000.0 + s] for s in range(30)]  # the latest run, each step once
    runs = list_runs(tmp_path).run.tolist()
    first = load_ticks(tmp_path, run=runs[0])
    assert losses(first) == [[s, float(s)] for s in range(20)]  # untouched, still readable
    both = load_ticks(tmp_path, run="all")
    assert len(both[both.state == "loss"]) == 50 and both.run.nunique() == 2
    with pytest.raises(ValueError, match="run='nope' is not in this tick directory"):
        load_ticks(tmp_path, run="nope")


SLOW_WRITER = """
import sys, time
from tick_lightning.records import Block
from tick_lightning.store import Recorder
rec = Recorder(); rec.reset()
rec.start(sys.argv[1], rank=0, start_step=0, manifest={})
print("started", flush=True)
for step in range(5):
    rec.write(step, 0, [Block.scalars("loss", {"value": 7.0 + step})])
    time.sleep(0.2)
sys.stdin.readline()  # hold the attempt open until the parent says so
rec.close()
"""


def test_two_processes_writing_one_directory_are_detected_and_both_kept(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    other = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert other.stdout.readline().strip() == "started"
        assert list_runs(tmp_path).running.tolist() == [True]
        with pytest.warns(UserWarning, match="another fit is recording into"):
            fit(tmp_path, range(3))
    finally:
        other.communicate("\n", timeout=60)
    assert other.returncode == 0
    runs = list_runs(tmp_path)
    assert runs.running.tolist() == [False, False] and runs.run.nunique() == 2
    both = load_ticks(tmp_path, run="all")
    assert sorted(both.groupby("run").size().tolist()) == [5, 9]  # 5 loss rows, and 3 x (loss + 2 grad)


def test_two_fits_starting_at_the_same_instant_still_see_each_other(tmp_path, monkeypatch):
    """Both look for other attempts at the same moment (a barrier): each must already show its own, or neither warns."""
    import threading
    import types

    from tick_lightning.store import recorder as recorder_module

    both_looking = threading.Barrier(2, timeout=30)
    read = recorder_module.read_attempts
    monkeypatch.setattr(recorder_module, "read_attempts", lambda d: (both_looking.wait(), read(d))[1])
    said = []
    monkeypatch.setattr(recorder_module, "warnings", types.SimpleNamespace(warn=lambda msg, **_: said.append(msg)))
    recs = [Recorder(), Recorder()]
    threads = [threading.Thread(target=r.start, args=(tmp_path,), kwargs=dict(rank=0, start_step=0, manifest={}))
               for r in recs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for r in recs:
        r.close()
    assert sum("another fit is recording into" in m for m in said) == 2, said  # each saw the other's lock


def test_attempt_lock_waits_out_another_fits_probe(tmp_path):
    """is_running takes a shared lock for an instant; a fit taking its lock at that instant must not fail."""
    import fcntl
    import threading

    from tick_lightning.store.lock import LOCK, AttemptLock, is_running

    probe = os.open(tmp_path / LOCK, os.O_RDONLY | os.O_CREAT)
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # the other fit's probe, caught mid-way
    taken = []
    t = threading.Thread(target=lambda: taken.append(AttemptLock(tmp_path)))
    t.start()
    t.join(timeout=0.3)
    os.close(probe)  # the probe ends
    t.join(timeout=30)
    assert len(taken) == 1 and is_running(tmp_path)
    taken[0].release()
    assert not is_running(tmp_path)


def test_attempt_names_sort_by_start_time():
    from tick_lightning.store.layout import new_attempt_id

    names = [new_attempt_id() for _ in range(50)]
    assert names == sorted(names) and len(set(names)) == 50


def test_reused_recorder_starts_a_new_run_unless_restored(tmp_path):
    rec = Recorder()
    for _ in range(2):
        rec.reset()
        rec.start(tmp_path, rank=0, start_step=0, manifest={})
        rec.write(0, 0, [Block.scalars("loss", {"value": 1.0})])
        rec.close()
    assert list_runs(tmp_path).run.nunique() == 2


def test_state_dict_makes_queued_ticks_durable(tmp_path, monkeypatch):
    """The checkpoint state is returned only once every tick written before it is a file on disk."""
    import time

    from tick_lightning.store import writer as writer_module

    real = writer_module.write_atomic
    monkeypatch.setattr(writer_module, "write_atomic", lambda t, p: (time.sleep(0.3), real(t, p)))
    rec = Recorder()
    rec.reset()
    rec.start(tmp_path, rank=0, start_step=0, manifest={})
    for step in range(3):
        rec.write(step, 0, [Block.scalars("loss", {"value": 1.0})])
    state = rec.state_dict()
    folder = rank_dir(tmp_path, state["attempt"], 0)
    assert sorted(p.name for p in folder.iterdir()) == [f"part-{i:08d}.parquet" for i in range(3)]
    rec.close()


def test_damage_is_contained_to_the_damaged_file(tmp_path):
    fit(tmp_path, range(3), crash=True)
    (attempt,) = list_runs(tmp_path).attempt
    (rank_dir(tmp_path, attempt, 0) / "part-00000001.parquet").write_bytes(b"not parquet")
    errors = []
    with pytest.warns(UserWarning, match="part-00000001"):
        df = load_ticks(tmp_path, errors=errors)
    assert sorted(df.step.unique()) == [0, 2] and len(errors) == 1


def test_a_damaged_compact_file_loses_only_its_attempt(tmp_path):
    ckpts = fit(tmp_path, range(6))
    fit(tmp_path, range(4, 8), resume=ckpts[4], value=100.0)
    first = list_runs(tmp_path).attempt[0]
    (compact,) = rank_dir(tmp_path, first, 0).glob("compact-*.parquet")
    compact.write_bytes(compact.read_bytes()[:50])
    with pytest.warns(UserWarning, match=compact.name):
        df = load_ticks(tmp_path)
    assert [s for s, _ in losses(df)] == [4, 5, 6, 7]


def test_only_unreadable_files_say_so(tmp_path):
    fit(tmp_path, range(2))
    (attempt,) = list_runs(tmp_path).attempt
    (compact,) = rank_dir(tmp_path, attempt, 0).glob("compact-*.parquet")
    compact.write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(TickRecordsError, match=f"exist but none is readable: .*{compact.name}"):
        load_ticks(tmp_path)


def test_unreadable_attempt_info_is_skipped_with_a_warning(tmp_path):
    fit(tmp_path, range(2))
    ckpt = fit(tmp_path, range(2), value=50.0)
    (attempt_dir(tmp_path, ckpt[1]["attempt"]) / "attempt.json").write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable attempt info"):
        df = load_ticks(tmp_path)
    assert losses(df) == [[0, 0.0], [1, 1.0]]


def test_bad_inputs_name_what_was_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_ticks(tmp_path / "missing")
    with pytest.raises(TickRecordsError, match="No tick records found"):
        load_ticks(tmp_path)
    rec = Recorder()
    rec.reset()
    rec.start(tmp_path, rank=0, start_step=0, manifest={})
    rec.close()
    with pytest.raises(TickRecordsError, match="1 attempt\\(s\\) started .* none reached its first tick"):
        load_ticks(tmp_path)


def test_unknown_schema_versions_are_refused(tmp_path):
    fit(tmp_path / "new", range(2))
    info = next((tmp_path / "new").glob("attempts/*/attempt.json"))
    info.write_text(json.dumps({**json.loads(info.read_text()), "schema_version": 99}))
    with pytest.raises(ValueError, match="schema version 99"):
        load_ticks(tmp_path / "new")
    (tmp_path / "old" / "rank0").mkdir(parents=True)
    (tmp_path / "old" / "manifest.json").write_text(json.dumps({"schema_version": 1}))
    with pytest.raises(ValueError, match="schema version 1"):
        load_ticks(tmp_path / "old")


def test_recipe_run_dir_is_accepted(tmp_path):
    fit(tmp_path / "ticks", [0, 1])
    assert losses(load_ticks(tmp_path)) == [[0, 0.0], [1, 1.0]]


def test_multi_rank_attempt(tmp_path):
    rec0, rec1 = Recorder(), Recorder()
    for rec in (rec0, rec1):
        rec.reset()
    attempt = "20260101T000000.000000-aaaaaaaa"
    rec0.start(tmp_path, rank=0, start_step=0, manifest={}, broadcast=lambda obj: attempt)
    rec1.start(tmp_path, rank=1, start_step=0, manifest={}, broadcast=lambda obj: attempt)
    for r, rec in enumerate((rec0, rec1)):
        rec.write(0, 0, [Block.scalars("loss", {"value": float(r)})])
        rec.close()
    df = load_ticks(tmp_path)
    assert df["rank"].tolist() == [0, 1] and df.value.tolist() == [0.0, 1.0] and df.attempt.nunique() == 1


# ------------------------------------------------------------------------------------------------ issue 36: damage
def _resumed(tmp_path):
    """Two attempts of one run: steps 0-5 (crashed after a checkpoint at 3), then 3-7."""
    ckpts = fit(tmp_path, range(6), crash=True)
    fit(tmp_path, range(3, 8), resume=ckpts[3], value=100.0)
    return list_runs(tmp_path).attempt.tolist()


def test_an_attempt_without_its_info_file_is_named_with_its_files(tmp_path):
    """Its rows were dropped without a word (2,098 of 3,150 returned)."""
    first, second = _resumed(tmp_path)
    (attempt_dir(tmp_path, second) / "attempt.json").unlink()
    with pytest.warns(UserWarning) as seen:
        df = load_ticks(tmp_path)
    text = " ".join(str(w.message) for w in seen)
    assert f"attempts/{second}" in text and "no attempt.json" in text
    assert str(next(rank_dir(tmp_path, second, 0).glob("*.parquet"))) in text  # each skipped file named
    assert losses(df) == [[s, float(s)] for s in range(6)]  # the rest, as recorded


def test_a_parquet_file_of_another_schema_is_refused_not_merged(tmp_path):
    """It added two all-NaN rows and turned step / epoch / rank into float64."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fit(tmp_path, range(4))
    (attempt,) = list_runs(tmp_path).attempt
    stray = rank_dir(tmp_path, attempt, 0) / "part-00000099.parquet"
    pq.write_table(pa.table({"x": [1.0, 2.0], "y": ["a", "b"]}), stray)
    with pytest.warns(UserWarning, match=f"{stray}.*not tick records"):
        df = load_ticks(tmp_path)
    assert losses(df) == [[s, float(s)] for s in range(4)]
    assert str(df.step.dtype) == "int64" and str(df["rank"].dtype).startswith("int")
    from tick_lightning.reporting import load_run

    with pytest.warns(UserWarning, match="not tick records"):
        assert sorted(load_run(tmp_path).steps) == [0, 1, 2, 3]


def test_a_second_copy_of_a_file_is_one_copy_with_a_warning(tmp_path):
    """1,575 duplicated keys came back without a word."""
    fit(tmp_path, range(4))
    (attempt,) = list_runs(tmp_path).attempt
    folder = rank_dir(tmp_path, attempt, 0)
    (compact,) = folder.glob("compact-*.parquet")
    copy = folder / "compact-00000000-00000003 (copy).parquet"
    copy.write_bytes(compact.read_bytes())
    twin = folder / "compact-00000001-00000003.parquet"  # a name the reader takes as records
    twin.write_bytes(compact.read_bytes())
    with pytest.warns(UserWarning) as seen:
        df = load_ticks(tmp_path)
    text = " ".join(str(w.message) for w in seen)
    assert f"{copy}" in text and "not a record file name" in text
    assert "duplicate" in text and str(twin) in text
    assert losses(df) == [[s, float(s)] for s in range(4)]


def test_a_removed_parent_attempt_is_a_broken_lineage_said(tmp_path):
    import shutil

    first, second = _resumed(tmp_path)
    shutil.rmtree(attempt_dir(tmp_path, first))
    with pytest.warns(UserWarning, match=f"lineage .* broken: attempt {second} resumed from attempt {first}.*missing"):
        df = load_ticks(tmp_path)
    assert [s for s, _ in losses(df)] == list(range(3, 8))


def test_a_removed_rank_folder_is_said_and_a_resume_on_fewer_ranks_is_not(tmp_path):
    """An attempt whose manifest says every rank wrote (``ranks="all"``, world size 2) but whose rank1/ is gone is
    named; an attempt that ran on one device (its own world size 1) is not."""
    import shutil

    from tick_lightning.records import ROW_SCHEMA

    ckpts = tiny.record(tmp_path, [(s, [("loss", "", "value", float(s))]) for s in range(6)], crash=True,
                        manifest={"schedule": "every:1", "ranks": "all", "world_size": 2})
    tiny.record(tmp_path, [(s, [("loss", "", "value", 100.0 + s)]) for s in range(3, 8)], resume=ckpts[3],
                manifest={"schedule": "every:1", "ranks": "all", "world_size": 1})
    first, second = list_runs(tmp_path).attempt.tolist()
    writer = TickWriter(rank_dir(tmp_path, first, 1), run=first, attempt=first, rank=1, background=False)
    writer.write(ROW_SCHEMA.empty_table().from_pylist(
        [dict(step=s, epoch=0, state="loss", name="", stat="value", value=float(s)) for s in range(3)],
        schema=ROW_SCHEMA))
    writer.close()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # whole, and the second attempt's one rank is its own world size
        load_ticks(tmp_path)
    shutil.rmtree(rank_dir(tmp_path, first, 1))
    with pytest.warns(UserWarning, match=f"attempt {first} has no rank1/ folder"):
        load_ticks(tmp_path)


def test_two_validations_at_one_step_are_both_kept_while_a_run_is_written(tmp_path):
    """Two writes of one key (metrics of two validations at one optimizer step) are records, before compaction as
    after it; only a file that repeats another row for row is a copy."""
    from tick_lightning.records import ROW_SCHEMA

    fit(tmp_path, range(4), crash=True)
    (attempt,) = list_runs(tmp_path).attempt
    writer = TickWriter(rank_dir(tmp_path, attempt, 0), run=attempt, attempt=attempt, background=False)
    for value in (0.9, 0.7):
        writer.write(ROW_SCHEMA.empty_table().from_pylist(
            [dict(step=3, epoch=0, state="metric", name="val_acc", stat="value", value=value)], schema=ROW_SCHEMA))
    writer.close(compact=False)
    df = load_ticks(tmp_path)
    assert sorted(df[df.state == "metric"].value) == [0.7, 0.9]


def test_a_full_disk_during_a_fit_is_one_line_naming_the_directory(tmp_path, monkeypatch, capsys):
    """It stopped training with two chained tracebacks; the records up to then stay readable."""
    import errno

    from tick_lightning import TickCallback
    from tick_lightning.store import TickWriteError
    from tick_lightning.store import writer as writer_module

    real, count = writer_module.write_atomic, [0]

    def full(table, path):
        count[0] += 1
        if count[0] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(table, path)

    monkeypatch.setattr(writer_module, "write_atomic", full)
    cb = TickCallback(ticks="every:2", states=["loss"], dirpath=tmp_path / "ticks", dense=False)
    with pytest.raises(TickWriteError) as err:
        tiny.trainer(tmp_path, callbacks=[cb], max_steps=12).fit(tiny.HFClassifier(tiny.tiny_bert()),
                                                                  tiny.loader(tiny.token_dataset(96)))
    line = str(err.value)
    assert "\n" not in line and err.value.__cause__ is None and err.value.__suppress_context__
    assert line.startswith(f"tick-lightning could not write tick records to '{tmp_path / 'ticks'}")
    assert "No space left on device (errno 28)" in line
    monkeypatch.setattr(writer_module, "write_atomic", real)
    assert sorted(load_ticks(tmp_path / "ticks").step.unique()) == [0, 2]  # what was written stays
