"""The guard's three rules as device math: running statistics in, a decision out, no host read.

Each rule keeps its statistics in small device tensors (fp64; fp32 on MPS) and, per optimizer step, takes the
step's judged values -- the global gradient norm, the loss, each tensor's norm, all already reduced over the
ranks, so every rank computes the same bits -- and returns a ``Decision``: whether to skip the update, and the
factors to scale gradients by. Everything is ``torch.where`` arithmetic on device scalars: a branch would need
the host to read a value (a sync every step). Counts of finite steps are device tensors for the same reason
(whether a step was finite is a device fact).

A non-finite step (the loss or any gradient NaN / inf) never enters a rule's statistics, whatever the mode.

Rules (statistics before the step):

* ``LogZRule``, for ``zclip`` (one column: the global gradient norm) and ``clip`` (a column per gradient tensor):
  ZClip's rule (Kumar et al. 2025) on the *log* of each norm. For ``warmup`` finite steps, the mean and
  population variance of ``x = log(norm)`` (Welford); then ``z = (x - mean) / (std + eps)``, and where
  ``z > z_thr`` the gradient is scaled to ``exp(mean + z_thr**2 * std / z)`` (ZClip's "adaptive scaling": the
  further out, the tighter); mean and variance follow an EMA (``alpha``) of ``x`` after clipping. In log space a
  norm that rises by decades while a model starts to learn moves the mean by steps the variance allows; in
  linear space ZClip's threshold falls behind such a rise and clips most later steps (measured: 122-444 of 500
  steps of a healthy SST-2 fit, 2-5 in log space, 0-1 at ``z=3``; docs/guard.md).
* ``SkipRule`` (OLMo-core's ``SkipStepOptimizer``): the last ``window`` finite values of each judged series in a
  device ring; once ``warmup`` are held, a step whose ``x - mean > z * std`` (sample std) in any judged series is
  skipped. Every finite value enters the ring, skipped or not, as in OLMo-core (a level shift is absorbed in
  time instead of skipping forever). The guard hands it the loss as it is and the log of the gradient norm: a
  norm that rises by decades while the model starts to learn is a run of 6-sigma outliers in linear space
  (OLMo-core's rule skipped 3-4 steps of each healthy SST-2 fit there, none in log space).

Example:
    >>> import torch
    >>> rule = LogZRule(z=3.0, alpha=0.97, warmup=3, width=1, device=torch.device("cpu"))
    >>> for x in (1.0, 1.2, 0.8):
    ...     _ = rule.decide(torch.tensor([x], dtype=torch.float64), torch.tensor(False))
    >>> d = rule.decide(torch.tensor([100.0], dtype=torch.float64), torch.tensor(False))
    >>> round(float(d.threshold), 4), round(float(d.factor), 6)   # exp(mean + 3**2 * std / z)
    (1.0408, 0.010408)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Decision", "LogZRule", "SkipRule", "stat_dtype"]

_EPS = 1e-6  # ZClip's: keeps a zero standard deviation from dividing by zero
_TINY = 1e-30  # the log of a zero norm (a tensor without gradient this step) stays finite


def stat_dtype(device: torch.device) -> torch.dtype:
    """fp64 for the running statistics (MPS has none: fp32)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


@dataclass
class Decision:
    """One step's verdict, all device tensors: ``skip`` (bool 0-d), ``factor`` (the global gradient multiplier,
    0-d), ``factors`` (per judged tensor, ``[k]``; ``ClipRule`` only), ``z`` per judged series (0-d, NaN in
    warm-up), ``threshold`` (the norm the global gradient was clipped to, NaN when it was not)."""

    skip: Tensor
    factor: Tensor
    z: dict
    threshold: Tensor
    factors: Tensor | None = None


class LogZRule:
    """Each column's log norm against its EMA mean and variance (module docstring); ``width`` columns."""

    def __init__(self, z: float, alpha: float, warmup: int, width: int, device: torch.device) -> None:
        self.z_thr, self.alpha, self.warmup = z, alpha, warmup
        dtype = stat_dtype(device)
        # per column: finite steps seen, mean and population variance of the log norm
        self.state = {k: torch.zeros(width, dtype=dtype, device=device) for k in ("count", "mean", "var")}

    def decide(self, norms: Tensor, nonfinite: Tensor, index: Tensor | None = None,
               judged: Tensor | None = None) -> Decision:
        """``norms[k]``: the norm of column ``index[k]`` (all columns in order without ``index``); ``judged[k]``:
        whether it may be clipped (bool; statistics are kept for every column). ``factors`` per ``norms``;
        ``factor``, ``z`` and ``threshold`` of the first column (the global norm, for ``zclip``)."""
        s = self.state
        take = (lambda t: t) if index is None else (lambda t: t.index_select(0, index))
        count, mean, var = take(s["count"]), take(s["mean"]), take(s["var"])
        x = norms.to(mean.dtype).clamp(min=_TINY).log()
        # a zero norm (no gradient this step: an unused parameter, a batch of padding) carries no scale: it is kept
        # out of the statistics and never clipped, as a missing gradient is
        finite = ~nonfinite & (norms > 0)
        warm = count < self.warmup
        std = var.sqrt()
        z = (x - mean) / (std + _EPS)
        clip = finite & ~warm & (z > self.z_thr)
        if judged is not None:
            clip = clip & judged
        limit = mean + self.z_thr ** 2 * std / torch.where(clip, z, torch.ones_like(z))
        factors = torch.where(clip, (limit - x).exp(), torch.ones_like(x))
        effective = torch.where(clip, limit, x)
        # warm-up: Welford's running mean and population variance of the finite log norms
        n = count + 1
        delta = x - mean
        w_mean = mean + delta / n
        w_var = var + (delta * (x - w_mean) - var) / n
        # after: the EMA of the effective (clipped) log norm, the variance about the updated mean (ZClip's order)
        e_mean = self.alpha * mean + (1 - self.alpha) * effective
        e_var = self.alpha * var + (1 - self.alpha) * (effective - e_mean) ** 2
        updates = {"mean": torch.where(finite, torch.where(warm, w_mean, e_mean), mean),
                   "var": torch.where(finite, torch.where(warm, w_var, e_var), var),
                   "count": count + finite.to(count.dtype)}
        for k, v in updates.items():
            if index is None:
                s[k] = v
            else:
                s[k].index_copy_(0, index, v)
        nan = torch.full_like(x[:1], float("nan")).reshape(())
        first = clip[0] if clip.numel() else torch.zeros((), dtype=torch.bool, device=x.device)
        return Decision(skip=nonfinite, factor=factors[0] if index is None else torch.ones_like(nan),
                        z={"grad_norm": torch.where(warm[0], nan, z[0])} if index is None else {},
                        threshold=torch.where(first, limit[0].exp(), nan) if index is None else nan,
                        factors=factors)


class SkipRule:
    """Each judged series against its rolling mean and sample standard deviation (module docstring)."""

    def __init__(self, z: float, window: int, on: tuple[str, ...], warmup: int, device: torch.device) -> None:
        self.z_thr, self.window, self.on, self.warmup = z, window, on, warmup
        dtype = stat_dtype(device)
        self.state = {}
        for k in on:
            # ring[window] is a scratch slot: a non-finite step writes there, so that no branch is needed
            self.state[f"ring_{k}"] = torch.zeros(window + 1, dtype=dtype, device=device)
            self.state[f"count_{k}"] = torch.zeros((), dtype=torch.long, device=device)  # values held, <= window
            self.state[f"next_{k}"] = torch.zeros((), dtype=torch.long, device=device)  # the slot the next takes
        self._slots = torch.arange(window + 1, device=device)

    def decide(self, values: dict, nonfinite: Tensor, missing: dict | None = None) -> Decision:
        """``values``: the judged series' values this step (a series missing from it, such as a loss the step did
        not report, is not judged and not kept); ``missing``: per series, a device flag for a value that is there
        but carries nothing (the log of a zero norm): not judged, not kept."""
        s = self.state
        missing = missing or {}
        outlier = torch.zeros((), dtype=torch.bool, device=nonfinite.device)
        zs = {}
        for k in self.on:
            if k not in values:
                continue
            ring, count = s[f"ring_{k}"], s[f"count_{k}"]
            x = values[k].to(ring.dtype).reshape(())
            finite = ~nonfinite & ~missing[k] if k in missing else ~nonfinite
            held = self._slots < count  # the ring's valid slots (the scratch slot never is)
            n = count.to(ring.dtype)
            mean = torch.where(held, ring, 0).sum() / n.clamp(min=1)
            std = (torch.where(held, (ring - mean) ** 2, 0).sum() / (n - 1).clamp(min=1)).sqrt()
            active = (count >= self.warmup) & finite
            outlier = outlier | (active & (x - mean > self.z_thr * std))
            zs[k] = torch.where(active, (x - mean) / std, torch.full_like(x, float("nan")))
            slot = torch.where(finite, s[f"next_{k}"], self.window).reshape(1)
            ring.index_copy_(0, slot, x.reshape(1))
            s[f"next_{k}"] = torch.where(finite, (s[f"next_{k}"] + 1) % self.window, s[f"next_{k}"])
            s[f"count_{k}"] = torch.where(finite, (count + 1).clamp(max=self.window), count)
        one = torch.ones((), dtype=torch.float32, device=nonfinite.device)
        return Decision(skip=nonfinite | outlier, factor=one, z=zs, threshold=torch.full_like(one, float("nan")))
