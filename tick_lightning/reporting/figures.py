"""The report's figures: matplotlib on the headless Agg backend, one PNG per view, nothing shown on screen.

Each function takes a loaded run (``RunData``) and a path, writes one PNG, and returns the path, or
``None`` when the run has nothing for that view (e.g. no re-normalization ran). Large runs stay fast:
heatmaps are one ``imshow`` of a step x layer array (at most ``MAX_COLUMNS`` tick columns, binned by
taking the most extreme value of each bin so a one-tick spike survives), and many-line plots become
heatmaps or one ``LineCollection``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the report runs on training machines without a display

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.collections import LineCollection
from matplotlib.colors import ListedColormap

__all__ = [
    "MAX_COLUMNS",
    "MAX_ROWS",
    "all_figures",
    "grad_heatmap",
    "heatmap",
    "loss_lr",
    "norm_inputs",
    "relative_to_first",
    "renorm",
    "root_cause_figures",
    "update_heatmap",
    "weight_norms",
    "why_empty",
]

MAX_COLUMNS = 1500  # tick columns drawn in a heatmap; more are binned
MAX_ROWS = 64  # a heatmap row per tensor up to this many; beyond, rows by module kind and by block
MAX_GROUP_ROWS = 48  # block rows at most: beyond, consecutive blocks share a row
MAX_EVENT_FIGURES = 8  # root-cause figures per report (the earliest events): a diverging run has many
DPI = 90


def _events(run) -> tuple[list[int], list[int]]:
    """Steps with a non-finite loss or gradient, and steps the fp16 scaler skipped."""
    bad: set[int] = set()
    if run.has("loss", "value"):
        loss = run.scalar("loss", "", "value")
        bad |= {int(s) for s, v in loss.items() if not np.isfinite(v)}
    if run.has("loss", "nonfinite"):
        bad |= {int(s) for s, v in run.scalar("loss", "", "nonfinite").items() if v > 0}
    if run.has("grad", "nonfinite"):
        g = run.rows("grad", "nonfinite")
        bad |= {int(s) for s in g.loc[g["value"] > 0, "step"].unique()}
    skipped: list[int] = []
    if run.has("amp", "skipped"):
        skipped = [int(s) for s, v in run.scalar("amp", "", "skipped").items() if v > 0]
    return sorted(bad), skipped


def _mark_events(ax, run, legend: bool = True) -> None:
    bad, skipped = _events(run)
    for i, s in enumerate(bad):
        ax.axvline(s, color="red", lw=1.2, alpha=0.7, label="non-finite" if i == 0 and legend else None)
    for i, s in enumerate(skipped):
        ax.axvline(s, color="orange", lw=1.0, ls="--", alpha=0.8, label="AMP step skipped" if i == 0 and legend else None)


def _mark_guard(ax, run, series: pd.Series | None) -> None:
    """The guard's interventions on a loss / grad-norm panel, at the value the step had before the guard acted
    (the dense series records it pre-guard): skipped updates as purple squares, clipped steps as purple
    triangles (ticks at the axis bottom where the value is not finite or not recorded)."""
    guard = getattr(run, "guard", None)
    if guard is None or guard.empty:
        return
    skipped = guard.index[guard.get("skipped", pd.Series(0, index=guard.index)) > 0]
    clipped = guard.index[(guard.get("skipped", 0) == 0) & (guard.get("clipped", 0) > 0)]
    for steps, marker, label in ((skipped, "s", "guard: update skipped"), (clipped, "v", "guard: gradient clipped")):
        if not len(steps):
            continue
        y = series.reindex(steps).to_numpy() if series is not None else np.full(len(steps), np.nan)
        finite = np.isfinite(y)
        if finite.any():
            ax.scatter(np.asarray(steps)[finite], y[finite], marker=marker, facecolors="none", edgecolors="purple",
                       s=36, zorder=6, label=label)
        if (~finite).any():
            ax.scatter(np.asarray(steps)[~finite], np.zeros((~finite).sum()), marker=marker, color="purple", s=24,
                       zorder=6, transform=ax.get_xaxis_transform(), clip_on=False,
                       label=None if finite.any() else label)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)  # constrained layout: one draw (bbox_inches="tight" draws twice)
    plt.close(fig)
    return path


def loss_lr(run, path: Path, findings=None) -> Path | None:
    """Loss (one line per rank), learning rate per param group, and the global gradient norm, over steps.

    With the dense per-step series (``run.dense``) the loss and gradient-norm curves are every optimizer
    step, ticks marked on top; without them, the ticks only. Non-finite steps are red lines, skipped AMP
    steps orange dashes, spikes found by the anomaly rules black crosses.
    """
    dense = getattr(run, "dense", {}) or {}
    dense_lr = {k[3:]: v for k, v in dense.items() if k.startswith("lr/")}
    panels = [p for p in (("loss", "value"), ("lr", "lr"), ("grad", "norm"))
              if run.has(*p) or (p[0] == "loss" and "loss" in dense) or (p[0] == "grad" and "grad_norm" in dense)
              or (p[0] == "lr" and dense_lr)]
    if not panels:
        return None
    spikes: dict[str, list[tuple[int, float]]] = {}
    for f in findings or ():
        if f.kind in ("loss_spike", "grad_spike"):
            spikes.setdefault(f.kind, []).append((f.step, f.value))
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels)), sharex=True, squeeze=False, layout="constrained")
    for ax, (state, stat) in zip(axes[:, 0], panels):
        if state == "loss":
            if "loss" in dense:
                d = dense["loss"]
                ax.plot(d.index, d.to_numpy(), lw=0.6, color="tab:blue", alpha=0.7, label="loss (every step)")
            per_rank = run.scalar("loss", "", "value", per_rank=True) if run.has("loss", "value") else pd.DataFrame()
            for rank in per_rank.columns:  # tick values are points: a line between ticks would invent values
                s = per_rank[rank]
                ax.plot(s.index, s.to_numpy(), marker="o", ms=3, ls="none",
                        label=(f"rank {rank}" if per_rank.shape[1] > 1 else "loss") + " at ticks")
            ax.set_ylabel("loss")
        elif state == "lr":
            for group, series in dense_lr.items():
                ax.plot(series.index, series.to_numpy(), lw=1, label=f"{group} (every step)")
            lr = run.wide("lr", "lr") if run.has("lr", "lr") else pd.DataFrame()
            for group in lr.columns:
                ax.plot(lr.index, lr[group].to_numpy(), marker="o", ms=3, ls="none",
                        label=f"{group} at ticks" if not dense_lr else None, color="black" if dense_lr else None)
            if not dense_lr and len(lr):
                ax.text(0.01, 0.02, "the learning rate at ticks only (dense=False): its schedule between them is not "
                        "recorded", transform=ax.transAxes, fontsize=7, color="#a60")
            ax.set_ylabel("learning rate")
        else:
            g = dense["grad_norm"] if "grad_norm" in dense else run.scalar("grad", "", "norm")
            if g.empty:
                ax.text(0.5, 0.5, why_empty(run, "grad", "norm", global_value=True), ha="center", va="center",
                        wrap=True, fontsize=8, transform=ax.transAxes)
            else:
                finite = g[np.isfinite(g)]
                every = "grad_norm" in dense
                ax.plot(finite.index, finite.to_numpy(), lw=0.8 if every else 0, color="tab:green",
                        marker=None if every else "o", ms=3,
                        label="global grad norm" + (" (every step)" if every else " at ticks"))
                if (finite > 0).all() and len(finite):
                    ax.set_yscale("log")
            ax.set_ylabel("grad norm")
        kind = {"loss": "loss_spike", "grad": "grad_spike"}.get(state)
        if spikes.get(kind):
            ax.scatter(*zip(*spikes[kind]), marker="x", color="black", s=40, zorder=5, label="spike")
        if state in ("loss", "grad"):
            _mark_guard(ax, run, dense.get("loss" if state == "loss" else "grad_norm"))
        _mark_events(ax, run, legend=state == "loss")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize=7)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step (optimizer steps)")
    axes[0, 0].set_title("Loss, learning rate and global gradient norm")
    return _save(fig, path)


def why_empty(run, state: str, stat: str, global_value: bool = False) -> str:
    """Why ``state/stat`` has nothing to draw, from what the manifest and records say (one sentence).

    Example:
        >>> import tempfile
        >>> from tick_lightning.reporting.data import load_run
        >>> from tick_lightning.reporting.synthetic import write_synthetic_run
        >>> why_empty(load_run(write_synthetic_run(tempfile.mkdtemp(), ticks=3, norm_modules=0)), "norm_input", "rms")
        'no norm_input rms recorded: no normalization layer was found or selected (norm_select) in SyntheticModel'
    """
    m = run.manifest
    what = f"no {'global ' if global_value else ''}{state} {stat} recorded"
    states = m.get("states")
    if states is not None and state not in states:
        return f"{what}: {state!r} is not among this run's states ({', '.join(states)}); add it to TickCallback(states=...)"
    schedule = (m.get("state_schedules") or {}).get(state)
    if schedule is not None and "off" in str(schedule):
        return f"{what}: its schedule is {schedule!r}"
    if state == "norm_input":
        layers = m.get("norm_layers")
        if layers is not None and not layers:
            return (f"{what}: no normalization layer was found or selected (norm_select) in "
                    f"{m.get('model_class', 'the model')}")
        if layers:
            return (f"{what}: {len(layers)} norm layers were watched but their forward hooks never fired "
                    "(a torch.compile'd model runs its graph without Python hooks: use patch_norms=True, whose "
                    "layers record from inside; or the layers were replaced after setup)")
    if state in ("grad", "update") and not run.has("grad", "norm") and not run.has("weight", "norm"):
        return f"{what}: no parameter was selected (TickCallback(select=...))"
    if run.has(state, stat):
        values = run.rows(state, stat)["value"].to_numpy(np.float64)
        if not np.isfinite(values).any():
            reason = f"{state} {stat} was recorded but every value is NaN/inf"
            if run.has("amp", "skipped"):
                skipped = run.scalar("amp", "", "skipped")
                n = int((skipped > 0).sum())
                reason += (f"; the fp16 GradScaler skipped {n} of {len(skipped)} tick steps "
                           f"(precision {m.get('precision', '?')}: a skipped step applies no update)")
            return reason
    if state == "update" and run.has("update", "norm"):
        return f"{what}: update norms recorded without weight norms to divide by"
    return f"{what} at any tick of this run (states recorded: {', '.join(map(str, states or ['?']))})"


def _placeholder(path: Path, title: str, reason: str) -> Path:
    """A small figure saying why a view is empty, in the place where the view would be."""
    fig, ax = plt.subplots(figsize=(9, 1.4), layout="constrained")
    ax.set_axis_off()
    ax.set_title(title, fontsize=10, loc="left")
    ax.text(0.0, 0.5, reason, ha="left", va="center", wrap=True, fontsize=9, color="#a60", transform=ax.transAxes)
    return _save(fig, path)


def _bin_columns(values: np.ndarray, steps: np.ndarray, max_columns: int, center: float | None):
    """Reduce tick columns to at most ``max_columns`` bins, keeping each bin's value farthest from ``center``
    (the median when None), so a single anomalous tick stays visible in a 10,000-tick run."""
    n = values.shape[1]
    if n <= max_columns:
        return values, steps
    edges = np.linspace(0, n, max_columns + 1).astype(int)
    c = np.nanmedian(values) if center is None else center
    dev = np.abs(np.nan_to_num(values - c, nan=-1.0))
    out = np.empty((values.shape[0], max_columns))
    for b in range(max_columns):
        block = dev[:, edges[b]:edges[b + 1]]
        pick = np.argmax(block, axis=1) + edges[b]
        out[:, b] = values[np.arange(values.shape[0]), pick]
    return out, steps[edges[:-1]]


def short_names(names: list[str]) -> list[str]:
    """``names`` less their longest common dotted prefix (``model.bert.``), so labels say what differs.

    Example:
        >>> short_names(["model.bert.encoder.layer.0.w", "model.bert.pooler.w"])
        ['encoder.layer.0.w', 'pooler.w']
    """
    if len(names) < 2:
        return [n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] if n.count(".") >= 2 else n for n in names]
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return [".".join(p[common:]) for p in parts]


_BLOCK = re.compile(r"^(?P<block>(?:.*?\.)?\d+)\.(?P<kind>.+)$")


def block_and_kind(name: str) -> tuple[str | None, str]:
    """``("encoder.layer.3", "attention.self.query.weight")``: a tensor's block (up to its first index) and its kind
    within the block; ``(None, name)`` for a tensor outside the repeated blocks (embeddings, the head).

    Example:
        >>> block_and_kind("h.3.attn.c_attn.weight"), block_and_kind("wte.weight")
        (('h.3', 'attn.c_attn.weight'), (None, 'wte.weight'))
    """
    m = _BLOCK.match(name)
    return (m.group("block"), m.group("kind")) if m else (None, name)


def _extreme_rows(values: np.ndarray, members: list[list[int]]) -> np.ndarray:
    """Per group and column, the member value farthest from the group's median in that column (a single tensor's
    jump stays visible in its group's row); NaN where no member has a value."""
    out = np.full((len(members), values.shape[1]), np.nan)
    for g, idx in enumerate(members):
        block = values[idx]
        if not np.isfinite(block).any():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
            med = np.nanmedian(block, axis=0)
        dev = np.abs(np.nan_to_num(block - med, nan=-1.0))
        pick = np.argmax(dev, axis=0)
        out[g] = block[pick, np.arange(block.shape[1])]
    return out


def _panels(values: np.ndarray, nonfinite: np.ndarray, names: list[str]) -> list[tuple]:
    """``(title, row labels, values, nonfinite, {name: row})`` per panel: a row per tensor (labels without their
    common prefix) up to ``MAX_ROWS`` tensors; beyond, one panel of module kinds (each row the most extreme of its
    blocks' tensors) and one of blocks (each the most extreme of its tensors): readable at 723 tensors."""
    short = short_names(names)
    if len(names) <= MAX_ROWS:
        return [(None, short, values, nonfinite, {n: i for i, n in enumerate(names)})]
    parts = [block_and_kind(n) for n in short]
    kinds = list(dict.fromkeys(k for _, k in parts))
    blocks = list(dict.fromkeys(b for b, _ in parts if b is not None))
    by_kind = [[i for i, (_, k) in enumerate(parts) if k == kind] for kind in kinds]
    by_block = [[i for i, (b, _) in enumerate(parts) if b == block] for block in blocks]
    if len(blocks) > MAX_GROUP_ROWS:  # 80 layers: consecutive blocks share a row ("10-11")
        size = -(-len(blocks) // MAX_GROUP_ROWS)
        spans = [range(i, min(i + size, len(blocks))) for i in range(0, len(blocks), size)]
        by_block = [[i for b in span for i in by_block[b]] for span in spans]
        blocks = [blocks[span[0]] if len(span) == 1 else f"{blocks[span[0]]}-{blocks[span[-1]].rsplit('.', 1)[-1]}"
                  for span in spans]
    panels = []
    for title, labels, members in (("by module kind: each row the most extreme of its blocks", kinds, by_kind),
                                   ("by block: each row the most extreme of its tensors", blocks, by_block)):
        if not members:
            continue
        counts = [len(m) for m in members]
        rows = {names[i]: g for g, idx in enumerate(members) for i in idx}
        bad = np.array([nonfinite[idx].any(axis=0) for idx in members])
        panels.append((title, [f"{lab} ({n})" for lab, n in zip(labels, counts)], _extreme_rows(values, members),
                       bad, rows))
    return panels


def heatmap(wide: pd.DataFrame, path: Path, title: str, cbar: str, cmap: str = "viridis",
            center: float | None = None, vlim: tuple[float, float] | None = None,
            marks: tuple[list[int], list[int]] = ([], []), cells: list[tuple[int, str]] = (),
            xlabel: str = "tick step", log: bool = True) -> Path | None:
    """A layer x tick heatmap of log10 values (``log=False``: the values as they are; non-finite cells drawn in
    red). ``wide`` is step x layer. Every row is labelled: up to ``MAX_ROWS`` tensors one row each, beyond that one
    panel by module kind and one by block (``_panels``).

    ``cells`` (step, layer) are circled: the anomaly findings, which a colour scale shared by layers whose
    norms differ by orders of magnitude would not show on its own.
    """
    if wide.empty:
        return None
    steps = wide.index.to_numpy()
    raw = wide.to_numpy(np.float64).T  # layer x tick
    nonfinite = ~np.isfinite(raw) & ~np.isnan(raw)
    if not np.isfinite(raw).any() and not nonfinite.any():
        return None  # every cell NaN: an empty axis would say nothing; the caller says why
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.log10(np.where(np.isfinite(raw) & (raw > 0), raw, np.nan)) if log else \
            np.where(np.isfinite(raw), raw, np.nan)
    finite = values[np.isfinite(values)]
    if vlim is None and finite.size:
        lo, hi = np.percentile(finite, [1, 99])
        vlim = (lo, hi) if hi > lo else (lo - 1, hi + 1)
    panels = _panels(values, nonfinite, list(wide.columns))
    heights = [max(6, len(p[1])) for p in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, min(22, 1.6 + sum(0.13 * h + 0.5 for h in heights))),
                             squeeze=False, layout="constrained", gridspec_kw={"height_ratios": heights})
    cm = plt.get_cmap(cmap).with_extremes(bad="white")
    for ax, (sub, labels, vals, bad, rows) in zip(axes[:, 0], panels):
        vals, col_steps = _bin_columns(vals, steps, MAX_COLUMNS, center)
        im = ax.imshow(vals, aspect="auto", interpolation="nearest", cmap=cm,
                       vmin=vlim[0] if vlim else None, vmax=vlim[1] if vlim else None)
        if bad.any():
            nf, _ = _bin_columns(bad.astype(float), steps, MAX_COLUMNS, 0.0)
            ax.imshow(np.ma.masked_where(nf < 0.5, nf), aspect="auto", interpolation="nearest",
                      cmap=ListedColormap(["red"]), vmin=0, vmax=1)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=max(4.5, min(7.0, 420 / max(1, len(labels)))))
        xt = np.linspace(0, len(col_steps) - 1, min(10, len(col_steps))).astype(int)
        ax.set_xticks(xt)
        ax.set_xticklabels([str(int(col_steps[i])) for i in xt], fontsize=7)
        col_of = {int(st): i for i, st in enumerate(col_steps)}
        for st, color, ls in [(x, "red", "-") for x in marks[0]] + [(x, "orange", "--") for x in marks[1]]:
            i = col_of.get(st, int(np.searchsorted(col_steps, st, side="right")) - 1)
            ax.axvline(i, color=color, lw=0.8, ls=ls, alpha=0.6)
        pts = [(int(np.searchsorted(col_steps, st, side="right")) - 1, rows[n]) for st, n in cells if n in rows]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=60, facecolors="none", edgecolors="black",
                       linewidths=1.2, label="anomaly")
            ax.legend(loc="upper right", fontsize=7)
        if sub:
            ax.set_title(sub, fontsize=9, loc="left")
        fig.colorbar(im, ax=ax, label=cbar, fraction=0.03, pad=0.01)
    axes[-1, 0].set_xlabel(xlabel + (f" ({len(steps)} ticks in {len(col_steps)} bins, most extreme per bin)"
                                     if len(col_steps) < len(steps) else ""))
    fig.suptitle(f"{title} ({wide.shape[1]} tensors)" if len(panels) > 1 else title)
    return _save(fig, path)


def _cells(findings, kinds: tuple[str, ...]) -> list[tuple[int, str]]:
    return [(f.step, f.layer) for f in findings or () if f.kind in kinds]


def grad_heatmap(run, path: Path, findings=None) -> Path | None:
    """Gradient norm per layer and tick (log10); non-finite gradients in red, exploding/vanishing ones circled."""
    return heatmap(run.wide("grad", "norm"), path, "Gradient norm per layer (log10)", "log10 grad norm",
                   marks=_events(run), cells=_cells(findings, ("exploding_grad", "vanishing_grad", "dead_grad")))


def update_heatmap(run, path: Path, findings=None) -> Path | None:
    """Update/weight ratio per layer and tick (log10), centred on this run's own median ratio (an Adam fine-tune
    sits near 1e-4 .. 1e-3, pre-training near 1e-3: no fixed "healthy" value fits both); columns where the learning
    rate was 0 (warm-up start) are said to be blank; out-of-band runs circled at their start."""
    ratio = run.wide("update", "ratio")
    finite = ratio.to_numpy(np.float64)
    finite = finite[np.isfinite(finite) & (finite > 0)]
    if not finite.size:
        return heatmap(ratio, path, "Update / weight ratio per layer (log10)", "log10 update/weight", cmap="coolwarm")
    logs = np.log10(finite)
    mid = float(np.median(logs))
    top = max(0.5, float(np.percentile(np.abs(logs - mid), 99)))
    title = f"Update / weight ratio per layer (log10), centred on this run's median 1e{mid:+.1f}"
    lr = run.wide("lr", "lr") if run.has("lr", "lr") else pd.DataFrame()
    zero = [int(st) for st, row in lr.iterrows() if len(row) and (row.fillna(0) == 0).all()]
    if zero:
        title += f"; blank at step{'s' if len(zero) > 1 else ''} {', '.join(map(str, zero[:5]))}: learning rate 0"
    return heatmap(ratio, path, title, "log10 update/weight", cmap="coolwarm", center=mid,
                   vlim=(mid - top, mid + top), marks=_events(run),
                   cells=_cells(findings, ("update_ratio_high", "update_ratio_low", "frozen")))


def relative_to_first(wide: pd.DataFrame) -> pd.DataFrame:
    """Each column divided by its first positive finite value: a zero-initialised bias starts at norm 0, and
    dividing by the first tick made its whole row NaN (blank in the figure).

    Example:
        >>> relative_to_first(pd.DataFrame({"w": [2.0, 4.0], "b": [0.0, 0.5]})).to_numpy().tolist()
        [[1.0, 0.0], [2.0, 1.0]]
    """
    return wide / wide.where(wide > 0).bfill().iloc[0]


def weight_norms(run, path: Path, findings=None, max_lines: int = 12) -> Path | None:
    """Weight norm per layer over ticks, as the change since the first tick in percent (a fine-tune moves norms by
    0.01-3 %: on a fixed log scale every row is the same grey), the colour scale taken from the data: lines for a
    few layers, else a heatmap."""
    w = run.wide("weight", "norm")
    if w.empty:
        return None
    change = (relative_to_first(w) - 1.0) * 100.0
    first = int(w.index[0])
    v = change.to_numpy(np.float64)
    v = v[np.isfinite(v)]
    top = max(1e-4, float(np.percentile(np.abs(v), 99))) if v.size else 1.0
    if w.shape[1] > max_lines:
        return heatmap(change, path, f"Weight norm change since step {first} (%)", "% change of the norm",
                       cmap="coolwarm", center=0.0, vlim=(-top, top), log=False)
    fig, ax = plt.subplots(figsize=(9, 4), layout="constrained")
    for name, label in zip(w.columns, short_names(list(w.columns))):
        ax.plot(change.index, change[name].to_numpy(), lw=1, marker="o", ms=2, label=label)
    _mark_events(ax, run, legend=False)
    ax.axhline(0.0, color="grey", lw=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel(f"% change since step {first}")
    ax.legend(fontsize=6, ncol=2, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(f"Weight norm change since step {first} (%), per layer")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _lines(ax, wide: pd.DataFrame, log: bool) -> None:
    x = wide.index.to_numpy(np.float64)
    segs = [np.column_stack([x, wide[c].to_numpy(np.float64)]) for c in wide.columns]
    colors = plt.get_cmap("viridis")(np.linspace(0, 1, max(1, len(segs))))
    if len(segs) <= 10:  # few layers: each tick a point (thin lines only guide the eye); many: one LineCollection
        for seg, color, name in zip(segs, colors, wide.columns):
            ax.plot(seg[:, 0], seg[:, 1], color=color, lw=0.5, ls=":", marker="o", ms=2.5, label=name)
        ax.legend(fontsize=6)
    else:
        ax.add_collection(LineCollection(segs, colors=colors, linewidths=0.8))
    v = wide.to_numpy(np.float64)
    v = v[np.isfinite(v)]
    if v.size:
        if log and (v > 0).all():
            ax.set_yscale("log")
        lo, hi = v.min(), v.max()
        pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
        ax.set_ylim(lo - pad if not (log and (v > 0).all()) else lo / 1.2, hi + pad if not (log and (v > 0).all()) else hi * 1.2)
    ax.set_xlim(x.min(), x.max() if x.max() > x.min() else x.min() + 1)


def norm_inputs(run, path: Path, findings=None) -> Path | None:
    """Mean, RMS and absmax of each normalization layer's input over ticks (one line per layer, earliest
    layer darkest), with non-finite and skipped steps marked."""
    stats = [s for s in ("mean", "rms", "absmax") if run.has("norm_input", s)]
    if not stats:
        return None
    fig, axes = plt.subplots(1, len(stats), figsize=(4.2 * len(stats), 3.4), squeeze=False, layout="constrained")
    for ax, stat in zip(axes[0], stats):
        _lines(ax, run.wide("norm_input", stat), log=stat != "mean")
        _mark_events(ax, run, legend=False)
        ax.set_title(f"norm input {stat}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Normalization-layer inputs ({run.wide('norm_input', stats[0]).shape[1]} layers)")
    return _save(fig, path)


def renorm(run, path: Path, findings=None) -> Path | None:
    """Re-normalization: norm after vs before (each point one parameter at one re-normalization), and the
    after/before ratio of norm and std over steps."""
    if not run.has("renorm", "norm_before"):
        return None
    before, after = run.wide("renorm", "norm_before"), run.wide("renorm", "norm_after")
    after = after.reindex_like(before)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    b, a = before.to_numpy().ravel(), after.to_numpy().ravel()
    axes[0].scatter(b, a, s=8, alpha=0.6)
    finite = np.isfinite(b) & np.isfinite(a)
    if finite.any():
        lo, hi = min(b[finite].min(), a[finite].min()), max(b[finite].max(), a[finite].max())
        axes[0].plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--", label="unchanged")
        axes[0].legend(fontsize=7)
    axes[0].set_xlabel("norm before")
    axes[0].set_ylabel("norm after")
    axes[0].set_title("Re-normalization: weight norms")
    for stat, color in (("norm", "tab:blue"), ("std", "tab:orange")):
        if not run.has("renorm", f"{stat}_before"):
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = run.wide("renorm", f"{stat}_after") / run.wide("renorm", f"{stat}_before")
        med = ratio.median(axis=1)
        axes[1].scatter(np.repeat(ratio.index.to_numpy(), ratio.shape[1]), ratio.to_numpy().ravel(), s=6,
                        alpha=0.3, color=color)
        axes[1].plot(med.index, med.to_numpy(), color=color, lw=1.2, label=f"{stat} after/before (median)")
    axes[1].axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[1].set_xlabel("step")
    axes[1].set_title("after / before per parameter")
    axes[1].legend(fontsize=7)
    return _save(fig, path)


def histograms(run, path: Path, findings=None) -> Path | None:
    """``grad_hist`` / ``weight_hist`` (fixed log2 bins of |x|): left, the whole model's distribution at each tick
    it was recorded (one line a tick, later darker); right, each tensor's distribution at the last of them
    (fraction of its elements per bin, log10), rows as in the heatmaps."""
    states = [st for st in ("grad_hist", "weight_hist") if run.has(st)]
    if not states:
        return None
    fig, axes = plt.subplots(len(states), 2, figsize=(12, 3.8 * len(states)), squeeze=False, layout="constrained",
                             gridspec_kw={"width_ratios": [1, 1.4]})
    for (left, right), state in zip(axes, states):
        rows = run.records.iloc[run._index(state)]
        bins = [str(c) for c in rows["stat"].cat.categories if str(c).startswith("2^") or str(c) in ("under", "over")]
        bins = sorted(bins, key=lambda c: -1e9 if c == "under" else 1e9 if c == "over" else int(c[2:]))
        rows = rows[rows["stat"].isin(bins)]
        per_tick = rows.groupby(["step", "stat"], observed=True)["value"].sum().unstack().reindex(columns=bins)
        used = [b for b in bins if (per_tick[b].fillna(0) > 0).any()] or bins
        lo, hi = bins.index(used[0]), bins.index(used[-1]) + 1
        colors = plt.get_cmap("viridis_r")(np.linspace(0.15, 1, len(per_tick)))
        for color, (step, row) in zip(colors, per_tick.iterrows()):
            total = row.sum()
            left.plot(range(hi - lo), (row.iloc[lo:hi] / total).to_numpy(), color=color, lw=1, label=f"step {step}")
        left.set_xticks(range(hi - lo)[::max(1, (hi - lo) // 8)])
        left.set_xticklabels(bins[lo:hi][::max(1, (hi - lo) // 8)], fontsize=7)
        left.set_ylabel("fraction of elements")
        left.set_title(f"{state}: the whole model at each tick", fontsize=9)
        if len(per_tick) <= 8:
            left.legend(fontsize=6)
        last = rows[rows["step"] == rows["step"].max()]
        table = last.pivot_table(index="name", columns="stat", values="value", aggfunc="sum", observed=True)
        table = table.reindex(columns=bins[lo:hi]).fillna(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.log10(table.to_numpy() / table.to_numpy().sum(axis=1, keepdims=True))
        frac[~np.isfinite(frac)] = np.nan
        names = [str(n) for n in table.index]
        panel = _panels(frac, np.zeros_like(frac, dtype=bool), names)[0]
        im = right.imshow(panel[2], aspect="auto", interpolation="nearest", cmap="magma",
                          vmin=-4, vmax=0)
        right.set_yticks(range(len(panel[1])))
        right.set_yticklabels(panel[1], fontsize=max(4.5, min(7.0, 420 / max(1, len(panel[1])))))
        right.set_xticks(range(hi - lo)[::max(1, (hi - lo) // 8)])
        right.set_xticklabels(bins[lo:hi][::max(1, (hi - lo) // 8)], fontsize=7)
        right.set_title(f"{state} per tensor at step {int(last['step'].iloc[0])} (log10 fraction)"
                        + (f"; {panel[0]}" if panel[0] else ""), fontsize=9)
        fig.colorbar(im, ax=right, fraction=0.03, pad=0.01)
    return _save(fig, path)


def metrics(run, path: Path, findings=None) -> Path | None:
    """The metrics the module logged, one panel each, at every validation of the fit."""
    table = getattr(run, "metrics", None)
    if table is None or table.empty:
        return None
    names = list(table.columns)[:12]
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False, layout="constrained")
    for ax, name in zip(axes.ravel(), names):
        series = table[name].dropna()
        ax.plot(series.index, series.to_numpy(), marker="o", ms=3, lw=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(names):]:
        ax.set_axis_off()
    fig.suptitle("Metrics logged by the module, at each validation" + (f" (first 12 of {table.shape[1]})"
                                                                       if table.shape[1] > 12 else ""))
    return _save(fig, path)


#: (file name, function, caption, (state, stat) it draws or None when the view is optional) of every
#: figure, in page order. A view with a (state, stat) and no data is a placeholder saying why.
FIGURES = (
    ("loss_lr.png", loss_lr, "Loss, learning rate and global gradient norm: lines are every optimizer step (the dense series), points the ticks; red: non-finite, orange: skipped AMP steps, x: spikes, purple: the guard's interventions (square: update skipped, triangle: gradient clipped; at the value before the guard acted).", ("loss", "value")),
    ("grad_norm_heatmap.png", grad_heatmap, "Gradient norm per layer and tick (log10); red cells are non-finite.", ("grad", "norm")),
    ("update_ratio_heatmap.png", update_heatmap, "Update/weight ratio per layer and tick (log10), centred on this run's own median: white is the run's typical ratio, red above, blue below (Adam fine-tunes sit near 1e-4 - 1e-3); a blank column is a step with learning rate 0.", ("update", "ratio")),
    ("weight_norms.png", weight_norms, "Weight norm per layer as the change since the first tick (%), colour scale from the data.", ("weight", "norm")),
    ("norm_inputs.png", norm_inputs, "Normalization-layer input statistics over ticks.", ("norm_input", "rms")),
    ("renorm.png", renorm, "Re-normalization before/after.", None),
    ("histograms.png", histograms, "Histograms of |gradient| / |weight| (fixed log2 bins), when grad_hist / weight_hist "
     "are recorded: the whole model at each tick, and each tensor at the last tick.", None),
    ("metrics.png", metrics, "Metrics the module logged (val_loss, val_acc, ...), at each validation of the fit; step: "
     "optimizer steps done.", None),
)


def all_figures(run, out_dir: Path, findings=None) -> list[tuple[Path, str]]:
    """Write every figure into ``out_dir``; returns ``(path, caption)`` pairs.

    ``findings`` (from ``find_anomalies``) are circled on the heatmaps and marked on the curves. A view
    the run has no data for is a small placeholder figure whose caption says why (``why_empty``), except
    the optional re-normalization view, left out when re-normalization did not run.
    """
    out = []
    for filename, fn, caption, drawn in FIGURES:
        p = fn(run, Path(out_dir) / filename, findings)
        if p is None and drawn is not None:
            reason = why_empty(run, *drawn)
            p = _placeholder(Path(out_dir) / filename, caption.split(" (")[0].split(";")[0], reason)
            caption = reason
        if p is not None:
            out.append((p, caption))
    return out


def _event_window(steps: np.ndarray, event_step: int, gap: int, after: int) -> np.ndarray:
    """The flight steps of the window holding ``event_step`` (runs at most ``gap`` apart), up to ``after``
    steps past it: what led up to the event and how it spread."""
    s = np.unique(steps)
    breaks = np.r_[0, np.flatnonzero(np.diff(s) > gap) + 1, len(s)]
    for lo, hi in zip(breaks[:-1], breaks[1:]):
        seg = s[lo:hi]
        if seg[0] <= event_step <= seg[-1] + gap:
            return seg[seg <= event_step + after]
    return s[:0]


def _input_label(name: str) -> str:
    return f"{name} [input]"


def root_cause_figure(run, path: Path, event, gap: int = 8, after: int = 16, circled: int = 5) -> Path | None:
    """One event (``rules.root_cause.Event``): the flight recorder's gradient norm per layer around it,
    each layer relative to its own median before the event (log10: 0 is usual, +1 is 10x), layers in
    backward order (nearest the output on top), then each norm layer's input absmax where recorded (rows
    ``<layer> [input]``), the event step a red line, non-finite gradients red cells, the start of the first
    ``circled`` ranked layers circled."""
    grad = (getattr(run, "flight", {}) or {}).get("grad_norm")
    if grad is None or grad.empty:
        return None
    window = _event_window(grad.index.to_numpy(), event.step, gap, after)
    if not len(window):
        return None
    order = list((run.manifest.get("flight") or {}).get("parameters") or grad.columns)
    names = [n for n in reversed(order) if n in grad.columns] + [n for n in grad.columns if n not in set(order)]
    g = grad.loc[window, names].astype(float)
    flags = (run.flight.get("nonfinite") if hasattr(run, "flight") else None)
    bad = (flags.reindex(index=window, columns=names).fillna(0).to_numpy() > 0) if flags is not None \
        else np.isnan(g.to_numpy())
    inputs = run.flight.get("input_absmax") if hasattr(run, "flight") else None
    if inputs is not None and not inputs.empty:
        x = inputs.reindex(index=window).astype(float).rename(columns=_input_label)
        g = pd.concat([g, x], axis=1)
        bad = np.hstack([bad, np.zeros(x.shape, dtype=bool)])  # a missing input absmax is no value, not a NaN
        names = names + list(x.columns)
    before = g[g.index < event.step]
    reference = before.where(before > 0).median() if len(before) else g.where(g > 0).median()
    rel = (g / reference).to_numpy(copy=True)
    rel[bad] = np.inf  # drawn red: a NaN norm of a NaN gradient is not "no data"
    rel = pd.DataFrame(rel, index=window, columns=names)
    finite = np.log10(rel.to_numpy()[np.isfinite(rel.to_numpy()) & (rel.to_numpy() > 0)])
    top = max(1.0, float(np.percentile(np.abs(finite), 99))) if finite.size else 1.0
    table = event.table.head(circled)
    cells = [(int(s), _input_label(n) if series == "input_absmax" else str(n))
             for s, n, series in zip(table.start_step, table.layer, table.series)]
    what = "grad norm (and norm input absmax)" if inputs is not None and not inputs.empty else "grad norm"
    return heatmap(rel, path, f"Step {event.step} ({event.trigger}): {what} / the layer's median before "
                   "(log10), output on top", f"log10 {what} / median before", cmap="coolwarm",
                   center=0.0, vlim=(-top, top), marks=([event.step], []), cells=cells,
                   xlabel="optimizer step (flight recorder)")


def root_cause_figures(run, out_dir: Path, events, max_events: int = MAX_EVENT_FIGURES) -> list[tuple[Path, str]]:
    """``root_cause_step<E>.png`` for each of the first ``max_events`` analysed events with a ranked layer;
    returns ``(path, caption)`` pairs."""
    out = []
    for event in [e for e in events if not e.table.empty][:max_events]:
        p = root_cause_figure(run, Path(out_dir) / f"root_cause_step{event.step}.png", event)
        if p is not None:
            first = event.table.iloc[0]
            layer = f"the input of {first.layer}" if first.series == "input_absmax" else first.layer
            out.append((p, f"Root cause of the {event.trigger} event at step {event.step}: {layer} deviated "
                           f"first (from step {int(first.start_step)}, lead {int(first.lead)} steps); "
                           f"{len(event.table)} layers deviated. Layers in backward order, red line: the event."))
    return out
