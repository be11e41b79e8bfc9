"""The guard's three rules as device math: running statistics in, a decision out, no host read.

Each rule keeps its statistics in small device tensors (fp64; fp32 on MPS) and, per optimizer step, takes the
step's judged values -- the global gradient norm, the loss, each tensor's norm, all already reduced over the
ranks, so every rank computes the same bits -- and returns a ``Decision``: whether to skip the update, and the
factors to scale gradients by. Everything is ``torch.where`` arithmetic on device scalars: a branch would need
the host to read a value (a sync every step). Counts of finite steps are device tensors for the same reason
(whether a step was finite is a device fact).

A non-finite step (the loss or any gradient NaN / inf) never enters a rule's statistics, whatever the mode.

Rules (``x`` a step's value, statistics before the step):

* ``ZClipRule`` (ZClip, Kumar et al. 2025): for ``warmup`` finite steps, mean and population variance of the
  global norm (Welford). Then ``z = (x - mean) / (std + eps)``; if ``z > z_thr`` the gradients are scaled to
  ``mean + z_thr**2 * std / z`` (the "adaptive scaling" rule); mean and variance follow an EMA (``alpha``) of the
  norm *after* clipping.
* ``SkipRule`` (OLMo-core's ``SkipStepOptimizer``): the last ``window`` finite values of each judged series in a
  device ring; once ``warmup`` are held, a step whose ``x - mean > z * std`` (sample std) in any judged series is
  skipped. Every finite value enters the ring, skipped or not, as in OLMo-core (a level shift is absorbed in
  time instead of skipping forever).
* ``ClipRule`` (AdaGC's per-tensor rule, Wang et al. 2025): each tensor's norm has a bias-corrected EMA ``g``
  (``beta``) of its own norms after clipping; once a tensor has ``warmup`` finite steps, its gradient is scaled
  by ``min(1, ratio * g / x)``.

Example:
    >>> import torch
    >>> rule = ZClipRule(z=2.5, alpha=0.97, warmup=3, device=torch.device("cpu"))
    >>> for x in (1.0, 1.2, 0.8):
    ...     _ = rule.decide(torch.tensor(x, dtype=torch.float64), torch.tensor(False))
    >>> d = rule.decide(torch.tensor(100.0, dtype=torch.float64), torch.tensor(False))
    >>> round(float(d.factor), 5), round(float(d.threshold), 4)   # clipped to mean + 2.5**2 * std / z
    (0.01002, 1.0017)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ClipRule", "Decision", "SkipRule", "ZClipRule", "stat_dtype"]

_EPS = 1e-6  # ZClip's: keeps a zero standard deviation from dividing by zero


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


class ZClipRule:
    """The global norm against its EMA mean and variance (module docstring)."""

    def __init__(self, z: float, alpha: float, warmup: int, device: torch.device) -> None:
        self.z_thr, self.alpha, self.warmup = z, alpha, warmup
        dtype = stat_dtype(device)
        # count of finite steps seen, mean, population variance
        self.state = {k: torch.zeros((), dtype=dtype, device=device) for k in ("count", "mean", "var")}

    def decide(self, norm: Tensor, nonfinite: Tensor) -> Decision:
        s = self.state
        count, mean, var = s["count"], s["mean"], s["var"]
        x = norm.to(mean.dtype)
        finite = ~nonfinite
        warm = count < self.warmup
        std = var.sqrt()
        z = (x - mean) / (std + _EPS)
        spike = finite & ~warm & (z > self.z_thr)
        threshold = mean + self.z_thr ** 2 * std / z
        factor = torch.where(spike, threshold / x, torch.ones_like(x))
        effective = torch.where(spike, threshold, x)
        # warm-up: Welford's running mean and population variance of the finite norms
        n = count + 1
        delta = x - mean
        w_mean = mean + delta / n
        w_var = var + (delta * (x - w_mean) - var) / n
        # after: the EMA of the effective (clipped) norm, the variance about the updated mean (ZClip's order)
        e_mean = self.alpha * mean + (1 - self.alpha) * effective
        e_var = self.alpha * var + (1 - self.alpha) * (effective - e_mean) ** 2
        s["mean"] = torch.where(finite, torch.where(warm, w_mean, e_mean), mean)
        s["var"] = torch.where(finite, torch.where(warm, w_var, e_var), var)
        s["count"] = count + finite.to(count.dtype)
        nan = torch.full_like(x, float("nan"))
        return Decision(skip=nonfinite, factor=factor, z={"grad_norm": torch.where(warm, nan, z)},
                        threshold=torch.where(spike, threshold, nan))


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

    def decide(self, values: dict, nonfinite: Tensor) -> Decision:
        """``values``: the judged series' values this step (a series missing from it, such as a loss the step did
        not report, is not judged and not kept)."""
        s = self.state
        finite = ~nonfinite
        outlier = torch.zeros((), dtype=torch.bool, device=nonfinite.device)
        zs = {}
        for k in self.on:
            if k not in values:
                continue
            ring, count = s[f"ring_{k}"], s[f"count_{k}"]
            x = values[k].to(ring.dtype).reshape(())
            held = self._slots < count  # the ring's valid slots (the scratch slot never is)
            n = count.to(ring.dtype)
            mean = torch.where(held, ring, 0).sum() / n.clamp(min=1)
            std = (torch.where(held, (ring - mean) ** 2, 0).sum() / (n - 1).clamp(min=1)).sqrt()
            active = count >= self.warmup
            outlier = outlier | (active & (x - mean > self.z_thr * std))
            zs[k] = torch.where(active, (x - mean) / std, torch.full_like(x, float("nan")))
            slot = torch.where(finite, s[f"next_{k}"], self.window).reshape(1)
            ring.index_copy_(0, slot, x.reshape(1))
            s[f"next_{k}"] = torch.where(finite, (s[f"next_{k}"] + 1) % self.window, s[f"next_{k}"])
            s[f"count_{k}"] = torch.where(finite, (count + 1).clamp(max=self.window), count)
        one = torch.ones((), dtype=torch.float32, device=nonfinite.device)
        return Decision(skip=nonfinite | outlier, factor=one, z=zs, threshold=torch.full_like(one, float("nan")))


class ClipRule:
    """Each tensor's norm against the bias-corrected EMA of its own clipped norms (module docstring)."""

    def __init__(self, ratio: float, beta: float, warmup: int, width: int, device: torch.device) -> None:
        self.ratio, self.beta, self.warmup = ratio, beta, warmup
        dtype = stat_dtype(device)
        self.state = {"ema": torch.zeros(width, dtype=dtype, device=device),  # EMA from 0, bias-corrected on use
                      "count": torch.zeros(width, dtype=dtype, device=device)}  # finite steps per tensor

    def decide(self, norms: Tensor, index: Tensor, judged: Tensor, nonfinite: Tensor) -> Decision:
        """``norms[k]``: the norm of column ``index[k]``; ``judged[k]``: whether ``select`` covers it (bool)."""
        s = self.state
        ema, count = s["ema"].index_select(0, index), s["count"].index_select(0, index)
        x = norms.to(ema.dtype)
        finite = ~nonfinite
        running = ema / (1 - self.beta ** count).clamp(min=1e-300)  # bias-corrected; 0 before any step
        limit = self.ratio * running
        clip = finite & judged & (count >= self.warmup) & (x > limit)
        factors = torch.where(clip, limit / x, torch.ones_like(x))
        new_ema = self.beta * ema + (1 - self.beta) * x * factors
        s["ema"].index_copy_(0, index, torch.where(finite, new_ema, ema))
        s["count"].index_copy_(0, index, count + finite.to(count.dtype))
        one = torch.ones((), dtype=torch.float32, device=x.device)
        return Decision(skip=nonfinite, factor=one, z={}, threshold=torch.full_like(one, float("nan")),
                        factors=factors)
