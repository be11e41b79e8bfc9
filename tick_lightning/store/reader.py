"""Reading a tick directory: which files a run's lineage keeps, ``load_ticks``, ``list_runs``, the manifest."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tick_lightning.records import flight_columns
from tick_lightning.store.layout import (
    ATTEMPTS,
    COMPACT,
    PART,
    SCHEMA_VERSION,
    Attempt,
    attempt_dir,
    lineage,
    read_attempts,
)
from tick_lightning.store.lock import is_running
from tick_lightning.store.writer import COLUMNS

__all__ = ["FLIGHT_ROW_STATES", "RecordFile", "has_records", "list_runs", "load_dense", "load_flight", "load_guard", "load_ticks", "read_manifest", "record_files", "resolve_run_dir"]


class TickRecordsError(FileNotFoundError):
    """A tick directory with nothing readable in it (the message says what was found)."""


@dataclass(frozen=True)
class RecordFile:
    """A record file and the first step of it that a later attempt recorded again (``None``: none)."""

    path: Path
    attempt: Attempt
    cutoff: int | None
    superseded: bool  # the whole attempt is outside the lineage


def resolve_run_dir(path: str | os.PathLike) -> Path:
    """Accept the tick directory itself or a directory holding it under ``ticks/`` (a recipe run dir)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Tick directory {str(path)!r} does not exist.")
    if (path / ATTEMPTS).is_dir() or (path / "manifest.json").exists():
        return path
    if (path / "ticks").is_dir():
        return path / "ticks"
    return path


def _check_layout(run_dir: Path) -> None:
    if (run_dir / "manifest.json").exists() and not (run_dir / ATTEMPTS).is_dir():
        raise ValueError(
            f"Tick records in {str(run_dir)!r} have schema version 1 (manifest.json + rank*/ folders); this "
            f"tick-lightning reads version {SCHEMA_VERSION}. Read them with the tick-lightning version that wrote them."
        )


def _checked_attempts(run_dir: Path, problems: list | None = None) -> list[Attempt]:
    _check_layout(run_dir)
    attempts = read_attempts(run_dir, problems)
    for a in attempts:
        if a.schema_version != SCHEMA_VERSION:
            raise ValueError(
                f"Tick records of attempt {a.attempt} in {str(run_dir)!r} have schema version {a.schema_version!r}; "
                f"this tick-lightning reads version {SCHEMA_VERSION}. Read them with the version that wrote them."
            )
    return attempts


def _pick_run(attempts: list[Attempt], run: str | None) -> list[str]:
    runs = list(dict.fromkeys(a.run for a in attempts))  # in order of first attempt
    if run == "all":
        return runs
    if run is None:  # the run whose attempt started last: what was just trained
        return [attempts[-1].run] if attempts else []
    if run not in runs:
        raise ValueError(f"run={run!r} is not in this tick directory; its runs are {runs} (or run='all').")
    return [run]


def _say(msg: str, problems: list | None) -> None:
    warnings.warn(msg, stacklevel=4)
    if problems is not None:
        problems.append(msg)


def _rank_files(folder: Path, problems: list | None = None) -> list[Path]:
    """A rank folder's compact files and the parts not yet merged into one (a crash between merge and delete);
    a parquet file of any other name is not read, and said so."""
    files = sorted(folder.glob("*.parquet"))
    for f in files:
        if not (PART.match(f.name) or COMPACT.match(f.name)):
            _say(f"skipping {f}: not a record file name (part-<n>.parquet or compact-<a>-<b>.parquet; a copy?), not "
                 "read", problems)
    merged = [(int(m.group(1)), int(m.group(2))) for f in files if (m := COMPACT.match(f.name))]
    keep = []
    for f in files:
        m = PART.match(f.name)
        if m and any(a <= int(m.group(1)) <= b for a, b in merged):
            continue
        if m or COMPACT.match(f.name):
            keep.append(f)
    return keep


def record_files(run_dir: str | os.PathLike, run: str | None = None, *, superseded: bool = False,
                 problems: list | None = None) -> tuple[list[RecordFile], list[Attempt]]:
    """The record files of the chosen run(s) (``None``: the latest; ``"all"``; a run id), oldest first.

    Without ``superseded`` only the lineages' files are listed (their ``cutoff`` still applies to rows).
    Also returns every attempt found, for messages and manifests.
    """
    run_dir = Path(run_dir)
    attempts = _checked_attempts(run_dir, problems)
    _check_attempt_folders(run_dir, attempts, problems)
    out: list[RecordFile] = []
    for r in _pick_run(attempts, run):
        chain = lineage(attempts, r)
        _check_lineage(run_dir, attempts, chain, problems)
        kept = {a.attempt: cutoff for a, cutoff in chain}
        for a in (x for x in attempts if x.run == r):
            inside = a.attempt in kept
            if not inside and not superseded:
                continue
            for folder in sorted(attempt_dir(run_dir, a.attempt).glob("rank*")):
                out += [RecordFile(f, a, kept.get(a.attempt), not inside) for f in _rank_files(folder, problems)]
    return out, attempts


def _check_attempt_folders(run_dir: Path, attempts: list[Attempt], problems: list | None) -> None:
    """An attempt folder without its ``attempt.json`` cannot be placed in a lineage: its files are named, unread."""
    known = {a.attempt for a in attempts}
    for folder in sorted((run_dir / ATTEMPTS).glob("*")) if (run_dir / ATTEMPTS).is_dir() else []:
        if folder.is_dir() and folder.name not in known and not (folder / "attempt.json").exists():
            files = [str(f) for rank in sorted(folder.glob("rank*")) for f in sorted(rank.glob("*.parquet"))]
            if files:
                _say(f"skipping attempts/{folder.name}: it has no attempt.json (its run and lineage are unknown); "
                     f"{len(files)} record file(s) not read: {', '.join(files)}", problems)


def _check_lineage(run_dir: Path, attempts: list[Attempt], chain: list, problems: list | None) -> None:
    """A resumed attempt whose parent is gone, and an attempt missing a rank folder its own manifest says it wrote
    (``ranks="all"`` and its world size; a resume on fewer devices writes fewer, and says so)."""
    known = {a.attempt for a in attempts}
    if chain:
        first = chain[0][0]
        if first.parent and first.parent not in known:
            _say(f"the lineage of run {first.run} is broken: attempt {first.attempt} resumed from attempt "
                 f"{first.parent}, which is missing from {str(run_dir)!r}; its rows before step "
                 f"{first.resumed_from_step} are not here", problems)
    for attempt, _ in chain:
        manifest = attempt.manifest or {}
        if manifest.get("ranks") != "all" or not isinstance(manifest.get("world_size"), int):
            continue  # one writing rank (rank 0), or an older manifest that does not say
        present = {p.name for p in attempt_dir(run_dir, attempt.attempt).glob("rank*")}
        for name in (f"rank{r}" for r in range(manifest["world_size"])):
            if name not in present:
                _say(f"attempt {attempt.attempt} has no {name}/ folder, which it wrote (ranks='all', world size "
                     f"{manifest['world_size']}; removed?): that rank's rows of this attempt are not here", problems)


def read_records(files: list[RecordFile], read=None, problems: list | None = None) -> tuple[list[pa.Table], list[Path]]:
    """Read each file (``read(path) -> Table``, default: every column) with a ``superseded`` column.

    An unreadable file is skipped with a warning naming it (and appended to ``problems``).
    """
    tables, unreadable = [], []
    for f in files:
        try:
            foreign = _foreign_schema(f.path)
            if foreign:
                msg = f"skipping {f.path}: its columns are not tick records' ({foreign})"
                warnings.warn(msg, stacklevel=3)
                if problems is not None:
                    problems.append(msg)
                continue
            table = read(f.path) if read is not None else pq.read_table(f.path, schema=COLUMNS)
        except Exception as err:  # noqa: BLE001 - a damaged file loses its own rows only, and says so
            msg = f"skipping unreadable tick file {f.path}: {type(err).__name__}: {err}"
            warnings.warn(msg, stacklevel=3)
            if problems is not None:
                problems.append(msg)
            unreadable.append(f.path)
            continue
        steps = table["step"].to_numpy()
        mask = np.full(len(steps), f.superseded) | (steps >= f.cutoff if f.cutoff is not None else False)
        tables.append((f, table.append_column("superseded", pa.array(mask))))
    return _without_duplicates(tables, problems), unreadable


def _without_duplicates(tables: list, problems: list | None) -> list[pa.Table]:
    """A file that repeats another file of its rank folder row for row (a second copy of a part or a compact file)
    is dropped, with a warning naming it. Only whole copies: two rows of one key written by two writes (two
    validations at one step) are both records. Folders with one file (a finished attempt) cost nothing."""
    folders: dict = {}
    for i, (f, t) in enumerate(tables):
        folders.setdefault(f.path.parent, []).append(i)
    keep = [t for _, t in tables]
    dropped: set[int] = set()
    for members in folders.values():
        for a, i in enumerate(members):
            if i in dropped:
                continue
            for j in members[a + 1:]:
                if j not in dropped and keep[i].num_rows == keep[j].num_rows and keep[i].equals(keep[j]):
                    dropped.add(j)
                    _say(f"{tables[j][0].path} repeats {tables[i][0].path} row for row (a duplicate copy?); "
                         "one copy is kept", problems)
    return [t for i, t in enumerate(keep) if i not in dropped]


def _foreign_schema(path: Path) -> str:
    """What is wrong with the columns of a parquet file for tick records (``""``: nothing); reads the footer only.
    A file another program left in a rank folder must not be merged (its missing columns would read as nulls)."""
    schema = pq.read_schema(path)
    missing = [f.name for f in COLUMNS if f.name not in schema.names]
    if missing:
        return f"missing {missing}, has {schema.names}"
    def kind(t):  # castable within a kind (large_string, a dictionary of strings, int64 for int32 ...)
        t = t.value_type if pa.types.is_dictionary(t) else t
        return "string" if pa.types.is_string(t) or pa.types.is_large_string(t) else "int" if \
            pa.types.is_integer(t) else "float" if pa.types.is_floating(t) else str(t)

    wrong = [f"{f.name}: {schema.field(f.name).type}" for f in COLUMNS
             if kind(schema.field(f.name).type) != kind(f.type)]
    return f"wrong types {wrong}" if wrong else ""


def no_records_error(run_dir: Path, files: list[RecordFile], unreadable: list[Path], attempts: list[Attempt]) -> str:
    if unreadable:
        return (f"Tick records in {str(run_dir)!r} exist but none is readable: {', '.join(map(str, unreadable))}. "
                "They may be damaged (a disk error, or a copy cut short).")
    if attempts:
        return (f"No tick records in {str(run_dir)!r} yet: {len(attempts)} attempt(s) started "
                f"({', '.join(a.attempt for a in attempts)}) but none reached its first tick.")
    return (f"No tick records found in {str(run_dir)!r} (expected attempts/<attempt>/rank*/*.parquet written by "
            "TickCallback; is this the run's ticks/ directory?).")


def load_ticks(path: str | os.PathLike, *, run: str | None = None, superseded: bool = False,
               dense: bool = False, flight: bool = False, errors: list | None = None):
    """Read the tick records of a tick directory (or a recipe run directory holding ``ticks/``) as a DataFrame.

    Columns: ``step, epoch, rank, run, attempt, state, name, stat, value`` (and ``superseded`` when
    asked for). By default the latest run is read, each of its tick steps once: rows of an attempt
    abandoned by a resume, or recorded after the checkpoint a later attempt resumed from, are left out.
    The dense per-step series (``state="dense"``, every optimizer step's loss and gradient norm) are
    left out unless ``dense=True``, and the flight recorder's rows (``state="flight"`` and ``"flight_event"``,
    per-parameter series of the steps around events) unless ``flight=True``, so ``step`` holds tick steps
    only; ``load_dense`` and ``load_flight`` read them wide.

    Args:
        run: ``None`` (the run that started last), a run id (see ``list_runs``) or ``"all"``.
        superseded: also return superseded rows, flagged in a ``superseded`` column (forensics).
        dense: also return the dense per-step rows.
        flight: also return the flight recorder's rows.
        errors: a list that receives one message per unreadable file (they are also warned about).

    Example:
        >>> df = load_ticks("lightning_logs/version_0/ticks")                       # doctest: +SKIP
        >>> df[(df.state == "grad") & (df.name == "")].plot(x="step", y="value")    # doctest: +SKIP
        >>> load_ticks("ticks", run="all").groupby("run").step.max()               # doctest: +SKIP
    """
    run_dir = resolve_run_dir(path)
    files, attempts = record_files(run_dir, run, superseded=superseded, problems=errors)
    tables, unreadable = read_records(files, problems=errors)
    if not tables:
        raise TickRecordsError(no_records_error(run_dir, files, unreadable, attempts))
    df = pa.concat_tables(tables).to_pandas()
    if not superseded:
        df = df[~df["superseded"]].drop(columns="superseded")
    left_out = ([] if dense else ["dense"]) + ([] if flight else list(FLIGHT_ROW_STATES))
    if left_out:
        df = df[~df["state"].isin(left_out)]
    # integer keys only: within a step and rank, rows keep the order they were recorded in
    return df.sort_values(["step", "rank"], kind="stable").reset_index(drop=True)


def has_records(path: str | os.PathLike) -> bool:
    """Whether a tick directory (or a directory holding ``ticks/``) holds any record file at all."""
    path = Path(path)
    return path.exists() and any(resolve_run_dir(path).glob(f"{ATTEMPTS}/*/rank*/*.parquet"))


def load_dense(path: str | os.PathLike, *, run: str | None = None, rank: int | None = 0):
    """Every optimizer step's dense series as a wide DataFrame: index ``step``, one column per series
    (``loss``, ``grad_norm``, and ``update_norm`` where recorded), each step once (the lineage rule).

    ``rank`` picks one rank's rows (``None``: the mean over ranks; losses differ per rank, norms do not).

    Example:
        >>> load_dense("ticks").loss.rolling(50).mean().plot()                     # doctest: +SKIP
    """
    df = load_ticks(path, run=run, dense=True)
    df = df[df["state"] == "dense"]
    if rank is not None:
        df = df[df["rank"] == rank]
    return df.pivot_table(index="step", columns="name", values="value", aggfunc="mean", dropna=False) \
        .rename_axis(columns=None)


#: the states of the flight recorder's rows (docs/records.md)
FLIGHT_ROW_STATES = ("flight", "flight_event")


def load_flight(path: str | os.PathLike, stat: str = "grad_norm", *, run: str | None = None, rank: int | None = 0):
    """The flight recorder's per-step series as a wide DataFrame: index ``step`` (the steps written around
    events, at checkpoints and at the end of fit), one column per parameter (``grad_norm``, ``nonfinite``,
    ``update_norm``), norm layer (``input_absmax``) or attention block (``attn_logit``), each step once (the lineage
    rule).

    ``load_flight(path, "events")`` returns the events instead: columns ``step, trigger, layer, z`` (``layer``: the
    parameter or norm layer of a one-layer event: a jump, a fall, a zero gradient, a trend; ``""`` for the others).

    Example:
        >>> g = load_flight("ticks")                                   # doctest: +SKIP
        >>> g.div(g.rolling(32, min_periods=8).median().shift()).idxmax(axis=1)   # doctest: +SKIP
    """
    df = load_ticks(path, run=run, flight=True)
    if rank is not None:
        df = df[df["rank"] == rank]
    if stat == "events":
        import pandas as pd

        ev = df[df["state"] == "flight_event"]
        names = ev["name"].astype(str).str.split("@", n=1, expand=True).reindex(columns=[0, 1])
        flight = read_manifest(path, run=run).get("flight") or {}

        def layer(trigger, column):
            if pd.isna(column):
                return ""
            names_ = flight_columns(flight, str(trigger))
            return names_[int(column)] if int(column) < len(names_) else f"#{int(column)}"

        out = pd.DataFrame({"step": ev["step"].to_numpy(), "trigger": names[0].to_numpy(),
                            "layer": [layer(t, c) for t, c in zip(names[0], pd.to_numeric(names[1], errors="coerce"))],
                            "z": ev["value"].to_numpy()})
        return out.drop_duplicates(["step", "trigger", "layer"]).reset_index(drop=True)
    df = df[(df["state"] == "flight") & (df["stat"] == stat)]
    return df.pivot_table(index="step", columns="name", values="value", aggfunc="mean", dropna=False, sort=False) \
        .sort_index().rename_axis(columns=None)


def load_guard(path: str | os.PathLike, *, run: str | None = None, rank: int | None = 0):
    """The guard's interventions (``TickCallback(guard=...)``), one row per step it acted on: ``step``, ``action``
    (``"skip"`` or ``"clip"``), ``trigger`` (``"nonfinite"``, ``"loss"``, ``"grad_norm"`` or ``"tensor"``: what
    made it act), ``tensors`` (the names of the tensors a ``clip`` scaled), and the step row's values: ``factor``,
    ``clipped``, ``loss``, ``grad_norm``, ``z_loss``, ``z_grad_norm``, ``threshold`` (docs/guard.md).

    Example:
        >>> load_guard("ticks")[["step", "action", "trigger"]]        # doctest: +SKIP
    """
    import numpy as np
    import pandas as pd

    df = load_ticks(path, run=run)
    df = df[df["state"] == "guard"]
    if rank is not None:
        df = df[df["rank"] == rank]
    columns = ["step", "action", "trigger", "tensors", "factor", "clipped", "loss", "grad_norm", "z_loss",
               "z_grad_norm", "threshold"]
    if df.empty:
        return pd.DataFrame(columns=columns)
    wide = df[df["name"] == ""].pivot_table(index="step", columns="stat", values="value", aggfunc="first",
                                            dropna=False)
    named = df[(df["name"] != "") & (df["stat"] == "factor")].groupby("step")["name"].agg(list)
    z = wide.reindex(columns=["z_loss", "z_grad_norm"])
    mode = read_manifest(path, run=run).get("guard", {}).get("mode")
    threshold = read_manifest(path, run=run).get("guard", {}).get("z", np.inf) or np.inf

    def trigger(step, row):
        if row.get("nonfinite", 0) > 0:
            return "nonfinite"
        if mode == "clip":
            return "tensor"
        if mode == "zclip":
            return "grad_norm"
        loud = {k: z.loc[step, f"z_{k}"] for k in ("loss", "grad_norm") if z.loc[step, f"z_{k}"] > threshold}
        return max(loud, key=loud.get) if loud else "grad_norm"

    out = pd.DataFrame({
        "step": wide.index.astype("int64"),
        "action": np.where(wide["skipped"] > 0, "skip", "clip"),
        "trigger": [trigger(step, row) for step, row in wide.iterrows()],
        "tensors": [named.get(step, []) for step in wide.index],
    })
    for c in columns[4:]:
        out[c] = wide[c].to_numpy() if c in wide else np.nan
    return out.reset_index(drop=True)


def list_runs(path: str | os.PathLike):
    """One row per attempt of a tick directory: ``run, attempt, parent, resumed_from_step, start_step,
    started, pid, host, running, in_lineage`` -- oldest first.

    Example:
        >>> list_runs("ticks")[["run", "attempt", "resumed_from_step", "in_lineage"]]   # doctest: +SKIP
    """
    import pandas as pd

    run_dir = resolve_run_dir(path)
    attempts = _checked_attempts(run_dir)
    kept = {a.attempt for r in dict.fromkeys(x.run for x in attempts) for a, _ in lineage(attempts, r)}
    rows = [{"run": a.run, "attempt": a.attempt, "parent": a.parent, "resumed_from_step": a.resumed_from_step,
             "start_step": a.start_step, "started": pd.Timestamp(a.started_ns, unit="ns", tz="UTC"), "pid": a.pid,
             "host": a.host, "running": is_running(attempt_dir(run_dir, a.attempt)), "in_lineage": a.attempt in kept}
            for a in attempts]
    return pd.DataFrame(rows, columns=["run", "attempt", "parent", "resumed_from_step", "start_step", "started",
                                       "pid", "host", "running", "in_lineage"])


def read_manifest(path: str | os.PathLike, run: str | None = None) -> dict:
    """The manifest (schedule, precision, parameters, ...) of a run's newest attempt; ``{}`` if none.

    It also holds ``run``, ``attempt`` and ``attempts`` (the lineage: attempt, resumed_from_step).
    """
    run_dir = Path(path)
    if not run_dir.exists():
        return {}
    attempts = _checked_attempts(resolve_run_dir(run_dir))
    chosen = _pick_run(attempts, run) if run != "all" else _pick_run(attempts, None)
    if not chosen:
        return {}
    chain = lineage(attempts, chosen[0])
    newest = chain[-1][0]
    return {**newest.manifest, "schema_version": newest.schema_version, "run": newest.run,
            "attempt": newest.attempt,
            "attempts": [{"attempt": a.attempt, "resumed_from_step": a.resumed_from_step, "start_step": a.start_step}
                         for a, _ in chain]}
