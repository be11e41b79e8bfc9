"""The tick report: figures and an anomaly summary a person reads instead of raw records.

``report(run_dir)`` writes into ``<run_dir>/report/`` (or ``out_dir``): one PNG per view, ``anomalies.md``,
``anomalies.csv`` and a self-contained ``index.html`` (figures embedded), and returns the ``index.html``
path. ``tick-lightning report RUN_DIR [--out DIR]`` is the same from a shell (``main``).

Works on a finished run, a crashed run (loose parts, no compact file) and a multi-rank run (loss per
rank; layer statistics merged, or one rank with ``rank=``). A corrupt part is reported and skipped.

Example:
    >>> import tempfile
    >>> from tick_lightning.reporting.synthetic import write_synthetic_run
    >>> run_dir = write_synthetic_run(tempfile.mkdtemp(), ticks=8, layers=4, spike=(40, "encoder.layer.0.mlp.weight", 1e3))
    >>> page = report(run_dir)
    >>> page.name, "exploding_grad" in (page.parent / "anomalies.md").read_text()
    ('index.html', True)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tick_lightning.reporting.anomalies import (
    Finding,
    Thresholds,
    find_anomalies,
    findings_frame,
    to_markdown,
)
from tick_lightning.reporting.data import ReportInputError, RunData, load_run
from tick_lightning.reporting.rules.base import Inputs

__all__ = ["Finding", "ReportInputError", "RunData", "Thresholds", "find_anomalies", "load_run", "main", "report"]


def _summary(run: RunData, findings: list[Finding], seconds: float) -> list[tuple[str, str]]:
    m = run.manifest
    steps = run.steps
    ranks = run.ranks
    names = run.records.loc[run.records["state"].isin(["grad", "weight", "update"]), "name"].unique()
    rows = [
        ("run directory", str(run.run_dir)),
        ("status", "finished" if run.finished else
         "did not finish: parts not compacted (the run crashed or is still running; or it recorded one tick only)"),
        ("ticks", f"{len(steps)} (steps {int(steps[0])} … {int(steps[-1])})" if len(steps) else "0"),
        ("ranks", ("rank " + str(run.rank)) if run.rank is not None else
         f"{len(ranks)} ({', '.join(map(str, ranks))})" + ("; loss per rank, layer statistics merged (mean; max for non-finite counts)" if len(ranks) > 1 else "")),
        ("parameters recorded", str(len([n for n in names if n]))),
        ("schedule", str(m.get("schedule", "?"))),
        ("precision", str(m.get("precision", "?"))),
        ("model", str(m.get("model_class", "?"))),
        ("run", str(m.get("run", "?"))),
        ("attempts", ", ".join(f"{a['attempt']} from step {a['start_step']}" for a in m.get("attempts", [])) or "?"),
        ("anomalies", str(len(findings))),
        *([("norm inputs not recorded", f"{len(m['norm_input_unobserved'])} layer(s), e.g. "
            f"{m['norm_input_unobserved'][0]}: the model was torch.compiled and they were not patched "
            "(TickCallback(patch_norms=True) records them)")] if m.get("norm_input_unobserved") else []),
        ("rendered in", f"{seconds:.1f} s"),
    ]
    return rows


def report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
           thresholds: Thresholds | None = None, rank: int | None = None) -> Path:
    """Render the report of a tick run directory; returns the path of its ``index.html``.

    ``run_dir`` is the tick directory (``<log_dir>/ticks``) or a recipe run directory holding ``ticks/``.
    ``out_dir`` defaults to ``<ticks dir>/report``. ``thresholds`` tunes the anomaly rules (see
    ``Thresholds``); ``rank`` shows one rank instead of merging them.

    Example:
        >>> report("lightning_logs/version_0/ticks")        # doctest: +SKIP
        PosixPath('lightning_logs/version_0/ticks/report/index.html')
    """
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
        raise ValueError(f"rank={rank!r}: pass a rank number >= 0, or None to merge all ranks.")
    start = time.perf_counter()
    run = load_run(run_dir, rank=rank)
    th = thresholds or Thresholds()
    inputs = Inputs(run)  # shared: the root-cause table is the one the findings were folded with
    findings = find_anomalies(run, th, inputs=inputs)
    out = (Path(out_dir) if out_dir is not None else run.run_dir / "report").absolute()
    if out.exists() and not out.is_dir():
        raise ReportInputError(f"--out {str(out)!r} is a file; pass a directory for the report.")
    try:  # written whole into a temporary sibling, then renamed into place: a failure or a kill leaves no half
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=_made(out.parent)))
    except OSError as err:
        raise ReportInputError(f"cannot write the report to {str(out)!r}: {err.strerror or err}.") from None
    try:
        _render(run, inputs, findings, th, staging, start)
        _swap_in(staging, out)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise ReportInputError(f"cannot write the report to {str(out)!r}: {err.strerror or err}.") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out / "index.html"


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


#: the file that says a directory was made by a report (and may be replaced by the next one whole)
MARKER = ".tick-report"


def _swap_in(staging: Path, out: Path) -> None:
    """``staging`` becomes ``out``. A missing ``out``, or one an earlier report made (its ``MARKER``, a plain
    directory), is replaced whole, the old one removed once the new one is in place (put back if that fails). Any
    other directory (a user's, the tick directory, a link, a mount) keeps what it holds: the report's files are
    moved into it one by one, each whole (``os.replace``)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp made it 0700: the published report is as readable as a mkdir's
    (staging / MARKER).write_text("written by tick-lightning report; the next report replaces this directory\n")
    ours = out.is_dir() and not out.is_symlink() and (out / MARKER).is_file() and not os.path.ismount(out)
    if out.exists() and not ours:
        for item in staging.iterdir():
            if item.name == MARKER:
                continue
            target = out / item.name
            if item.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            os.replace(item, target)
        shutil.rmtree(staging, ignore_errors=True)
        return
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rmdir(old)
        os.rename(out, old)
    try:
        os.rename(staging, out)
    except OSError:
        if old is not None:
            os.rename(old, out)  # the previous report back in its place
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _render(run, inputs, findings, th, out: Path, start: float) -> None:
    from tick_lightning.reporting.figures import all_figures, root_cause_figures
    from tick_lightning.reporting.html import render_html
    from tick_lightning.reporting.rules.root_cause import (
        analysed_events,
        root_cause_markdown,
        root_cause_table,
    )

    events = analysed_events(inputs, th)
    figures = all_figures(run, out, findings) + root_cause_figures(run, out, events)
    markdown = to_markdown(findings)
    causes = root_cause_table(inputs, th) if run.flight else None  # no flight recorder: no table, no section
    if causes is not None:
        causes.to_csv(out / "root_cause.csv", index=False)
        markdown += "\n\n" + root_cause_markdown(causes)
    if run.problems:
        markdown += "\n\nProblems reading the records (the rest was used):\n" + "\n".join(f"- {p}" for p in run.problems)
    (out / "anomalies.md").write_text("# Anomalies\n\n" + markdown + "\n")
    findings_frame(findings).to_csv(out / "anomalies.csv", index=False)
    page = render_html(_summary(run, findings, time.perf_counter() - start), findings, figures, run.problems,
                       root_cause=causes)
    (out / "index.html").write_text(page, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """``tick-lightning report RUN_DIR [--out DIR] [--rank R] [--grad-factor K]``: render and print the page path.

    Example:
        >>> main(["runs/demo"])      # doctest: +SKIP
        runs/demo/ticks/report/index.html
        0
    """
    parser = argparse.ArgumentParser(prog="tick-lightning report",
                                     description="Render figures and an anomaly summary of a tick run.")
    parser.add_argument("run_dir", help="tick directory (<log_dir>/ticks) or a recipe run directory holding ticks/")
    parser.add_argument("--out", default=None, help="output directory (default: <ticks dir>/report)")
    parser.add_argument("--rank", type=int, default=None, help="show one rank instead of merging all ranks")
    defaults = Thresholds()
    parser.add_argument("--grad-factor", type=float, default=defaults.grad_factor,
                        help=f"flag a layer's gradient norm this many times above/below its own median (default {defaults.grad_factor:g})")
    parser.add_argument("--ratio-low", type=float, default=defaults.ratio_low, help=f"default {defaults.ratio_low:g}")
    parser.add_argument("--ratio-high", type=float, default=defaults.ratio_high, help=f"default {defaults.ratio_high:g}")
    args = parser.parse_args(argv)
    try:
        th = Thresholds(grad_factor=args.grad_factor, ratio_low=args.ratio_low, ratio_high=args.ratio_high)
        index = report(args.run_dir, args.out, thresholds=th, rank=args.rank)
    except (ReportInputError, ValueError) as err:
        print(f"tick-lightning report: error: {err}", file=sys.stderr)
        return 2
    print(index)
    return 0
