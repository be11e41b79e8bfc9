"""Per-layer tick data where users already look: TensorBoard and W&B histograms and grouped scalars, scalars elsewhere.

``log_tick(loggers, step, blocks)`` takes a tick's *host* blocks (``tick_lightning.records.to_host``) and
sends, per state it finds:

===============================================  ===========================  ==============================
tag                                              what                         loggers
===============================================  ===========================  ==============================
``ticks/layers/grad_norm`` (histogram)           log10 of every layer's       TensorBoard, W&B
                                                 gradient norm at this tick
``ticks/layers/update_ratio`` (histogram)        log10 update/weight ratios   TensorBoard, W&B
``ticks/layers/weight_norm`` (histogram)         log10 weight norms           TensorBoard, W&B
``ticks/layers/<series>_{min,median,max}``       the same distributions as    every logger
                                                 three scalars (log10)
``ticks/layers/<series>_nonfinite``              layers with a non-finite     every logger
                                                 value
``ticks/grad_norm/<layer>``,                     the value (not log10) of     every logger
``ticks/update_ratio/<layer>``                   each *selected* layer
===============================================  ===========================  ==============================

Why histograms of per-layer values, not of every weight: one value per layer is what a person compares
(which layer's gradient left the pack), it costs nothing (the tick already has it on the host), and
TensorBoard's histogram and distribution tabs show 1,000 layers x 10,000 ticks without 1,000 lines.
Log10 because layers differ by orders of magnitude. TensorBoard groups scalars by the tag's prefix, so
each selected layer's values sit in a ``ticks/grad_norm`` and a ``ticks/update_ratio`` section; W&B groups
its panels by the same prefixes. Lightning's ``WandbLogger`` gets the histograms as ``wandb.Histogram``
(64 bins) in the same ``log_metrics`` call as the scalars: one W&B row per tick, at
``trainer/global_step`` = the tick's step (the x-axis WandbLogger defines for every metric). Loggers that
have no histogram (CSV, MLflow) get the scalars only.

Example:
    >>> import numpy as np, tempfile
    >>> from lightning.pytorch.loggers import CSVLogger
    >>> from tick_lightning.records import Block
    >>> grad = Block("grad", ("a.weight", "b.weight", ""), ("norm",), np.array([[1.0], [100.0], [100.0]]))
    >>> sent = log_tick([CSVLogger(tempfile.mkdtemp())], 10, [grad], select=["a.*"])
    >>> sorted(sent)[:2], sent["ticks/grad_norm/a.weight"]
    (['ticks/grad_norm/a.weight', 'ticks/layers/grad_norm_max'], 1.0)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

import numpy as np

__all__ = ["SERIES", "layer_series", "log_tick"]

#: (state, stat) -> series name: the per-layer values sent.
SERIES: dict[tuple[str, str], str] = {
    ("grad", "norm"): "grad_norm",
    ("update", "ratio"): "update_ratio",
    ("weight", "norm"): "weight_norm",
}
_SELECTED = ("grad_norm", "update_ratio")  # the series sent per selected layer


def layer_series(blocks: Sequence) -> dict[str, dict[str, float]]:
    """``{series: {layer: value}}`` of the host blocks' per-layer rows (global rows, name ``""``, left out).

    Example:
        >>> from tick_lightning.records import Block
        >>> layer_series([Block("update", ("w",), ("norm", "ratio"), np.array([[0.1, 1e-3]]))])
        {'update_ratio': {'w': 0.001}}
    """
    out: dict[str, dict[str, float]] = {}
    for b in blocks:
        for j, stat in enumerate(b.stats):
            series = SERIES.get((b.state, stat))
            if series is None:
                continue
            values = np.asarray(b.values, dtype=np.float64)[:, j]
            out.setdefault(series, {}).update({n: float(v) for n, v in zip(b.names, values) if n})
    return out


def _selected(names: Iterable[str], select: str | Sequence[str] | None, max_layers: int) -> list[str]:
    if select is None:
        return []
    patterns = [select] if isinstance(select, str) else list(select)
    chosen = [n for n in names if any(fnmatchcase(n, p) for p in patterns)]
    if len(chosen) > max_layers:
        raise ValueError(f"log_tick(select={select!r}) matches {len(chosen)} layers, more than max_layers="
                         f"{max_layers} grouped scalars (first: {chosen[:3]}); narrow the patterns or raise max_layers.")
    return chosen


def log_tick(loggers: Sequence, step: int, blocks: Sequence, *, select: str | Sequence[str] | None = None,
             max_layers: int = 32, prefix: str = "ticks", extra: dict[str, float] | None = None) -> dict[str, float]:
    """Send one tick's per-layer summaries to ``loggers`` (a Trainer's ``trainer.loggers``); returns the scalars.

    ``blocks`` are host blocks (``values`` numpy). ``select``: glob pattern(s) over parameter names whose
    gradient norm and update ratio are also sent as grouped scalars (at most ``max_layers``). Histograms go
    to loggers whose ``experiment`` has ``add_histogram`` (``TensorBoardLogger``) and to ``WandbLogger``
    (``wandb.Histogram`` values in its ``log_metrics`` row); the scalars go to every logger through
    ``log_metrics``, with ``extra`` scalars in the same call (``TickCallback``'s global tags).
    Call it on global rank 0 (Lightning's loggers are rank-zero only).

    Example:
        >>> log_tick([], 0, [])
        {}
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"log_tick(step={step!r}): must be an optimizer step >= 0.")
    if isinstance(max_layers, bool) or not isinstance(max_layers, int) or max_layers < 0:
        raise ValueError(f"log_tick(max_layers={max_layers!r}): must be an integer >= 0.")
    series = layer_series(blocks)
    scalars: dict[str, float] = dict(extra or {})
    histograms: dict[str, np.ndarray] = {}
    for name, per_layer in series.items():
        values = np.fromiter(per_layer.values(), dtype=np.float64, count=len(per_layer))
        usable = values[np.isfinite(values) & (values > 0)]
        scalars[f"{prefix}/layers/{name}_nonfinite"] = float(np.sum(~np.isfinite(values)))
        if usable.size:
            logs = np.log10(usable)
            histograms[f"{prefix}/layers/{name}"] = logs
            scalars[f"{prefix}/layers/{name}_min"] = float(logs.min())
            scalars[f"{prefix}/layers/{name}_median"] = float(np.median(logs))
            scalars[f"{prefix}/layers/{name}_max"] = float(logs.max())
    all_names = list(dict.fromkeys(n for s in _SELECTED for n in series.get(s, {})))
    for layer in _selected(all_names, select, max_layers):
        for name in _SELECTED:
            if layer in series.get(name, {}):
                scalars[f"{prefix}/{name}/{layer}"] = series[name][layer]
    for logger in loggers:
        if _is_wandb(logger):
            # One row per tick: the histograms travel in the same log_metrics call as the scalars. WandbLogger
            # logs ``dict(metrics, trainer/global_step=step)`` with wandb's own step advancing by one per call
            # (its charts use trainer/global_step as the x-axis); a separate ``experiment.log(..., step=step)``
            # would split the row, or be dropped when ``step`` is behind wandb's counter.
            import wandb

            row = {**scalars, **{tag: wandb.Histogram(values.tolist())
                                 for tag, values in histograms.items()}}
            if row:
                logger.log_metrics(row, step=int(step))
            continue
        writer = getattr(logger, "experiment", None) if hasattr(type(logger), "experiment") else None
        if histograms and writer is not None and callable(getattr(writer, "add_histogram", None)):
            for tag, values in histograms.items():
                writer.add_histogram(tag, values, global_step=int(step))
        if scalars:
            logger.log_metrics(scalars, step=int(step))
    return scalars


def _is_wandb(logger: object) -> bool:
    """A Lightning ``WandbLogger`` (``lightning.pytorch`` or ``pytorch_lightning``), told by class name so that
    neither wandb nor a Lightning flavour is imported to ask, or a logger that says it logs W&B rows
    (``wandb_rows = True``: ``tick_lightning.hf``'s bridge to the Trainer's ``WandbCallback``)."""
    return getattr(type(logger), "wandb_rows", False) is True or any(
        c.__name__ == "WandbLogger" and c.__module__.endswith("loggers.wandb") for c in type(logger).__mro__)
