"""Find normalization layers, and confirm what each one computes by running it (the numerical probe).

Two steps, so that nothing is patched on a guess:

1. *Candidates* (:func:`is_norm_candidate`, cheap, no forward): ``nn.LayerNorm``/``nn.RMSNorm``/``GroupNorm``
   and subclasses; classes named ``*LayerNorm``/``*RMSNorm``/``*Norm`` or tagged for a hub norm kernel
   (``kernel_layer_name``), with no children and only a 1-D ``weight``/``bias`` (or none at all). An
   epsilon attribute is not required: a parameter-free layer such as OLMo's ``OlmoLayerNorm`` hard-codes
   ``eps=1e-5`` in its ``forward``; the probe then infers it from ``EPS_CANDIDATES``.
2. *Probe* (:func:`probe_norm`): run the layer's original ``forward`` on a copy with a random (not all-ones)
   weight, first on fp32 input against the fp64 formulas of :mod:`.reference` (LayerNorm / RMSNorm, ``w`` or
   ``1 + w``, bias, channels-first), then on bf16 input with fp32 and with bf16 weights against each cast
   order of :mod:`.ops`. The variant whose output dtype matches and whose values are closest wins. Then,
   because some layers branch on ``torch.is_autocast_enabled()`` (``NemotronLayerNorm1P`` casts its
   arguments to the autocast dtype), the original and the chosen variant run on fp32 input under bf16
   autocast and must agree in dtype and within ``_HALF_TOL``. A layer that matches nothing is left alone
   and reported with the reason, except a "1P" LayerNorm (``1 + w``, bias), patched as its fp32-safe
   variant (:func:`_fp32_safe_1p`). Every probe tensor has an explicit dtype (fp32, then the half dtypes),
   so a model built, or probed, while ``torch.set_default_dtype(torch.bfloat16)`` is in effect is
   probed exactly as any other.

Example:
    >>> import torch
    >>> probe_norm(torch.nn.LayerNorm(8)).variant.name
    'layer*w+b/native'
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

# the structural test lives outside this package, so that tick_lightning.select (which norms/patch.py uses)
# can know the "norm" kind without importing norms: the dependency points one way, norms -> select
from tick_lightning.norm_candidates import EPS_ATTRS, is_norm_candidate, original_class
from tick_lightning.norms.ops import NormVariant, norm_forward
from tick_lightning.norms.reference import reference_norm

__all__ = ["EPS_ATTRS", "EPS_CANDIDATES", "FP32_SAFE_REASON", "ProbeResult", "is_norm_candidate", "norm_eps", "original_class", "probe_norm"]

#: Epsilons tried, in order, for a layer with no epsilon attribute (hard-coded in its forward).
EPS_CANDIDATES = (1e-5, 1e-6, 1e-12, 1e-8, 1e-7)
_FP32_TOL = 1e-4  # fp32 kernels agree with fp64 to ~1e-6; a different formula is off by >1e-2
_HALF_TOL = 2.0 ** -5  # 4 bf16 ulps at 1.0 (bf16 ulp 2^-7): the chosen cast order must be this close


def norm_eps(module: nn.Module) -> float | None:
    """The epsilon attribute of ``module`` under any of its usual names (``None`` when absent or None).

    Example:
        >>> norm_eps(torch.nn.LayerNorm(4, eps=1e-6))
        1e-06
    """
    for attr in EPS_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)):
            return float(value)
    return None


@dataclass
class ProbeResult:
    """Outcome of :func:`probe_norm`: ``variant`` is None when nothing matched, and ``reason`` says why."""

    variant: NormVariant | None
    eps: float | None
    shape: tuple[int, ...] | None
    reason: str


def _tensor_attr(module: nn.Module, name: str) -> torch.Tensor | None:
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


def _close(out: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    """Mean error when ``out`` is within ``tol`` (relative to the largest value) of ``ref``, else inf."""
    if out.shape != ref.shape:
        return float("inf")
    err = (out.double() - ref.double()).abs()
    if not torch.isfinite(err).all() or err.max() > tol * max(1.0, ref.abs().max().item()):
        return float("inf")
    return err.mean().item()


@contextlib.contextmanager
def _autocast(device_type: str) -> Iterator[None]:
    """bf16 autocast on ``device_type``, as a layer sees it when training under AMP on its device.

    Layers test it two ways: ``torch.is_autocast_enabled(device_type)`` and the device-less
    ``torch.is_autocast_enabled()``, which means *CUDA* autocast (``NemotronLayerNorm1P``). Probing on the
    CPU, the CUDA flag is set too (a thread-local flag: CPU tensors never dispatch through CUDA autocast),
    so the branch a GPU run takes is the branch probed.
    """
    legacy = device_type != "cuda" and not torch.is_autocast_enabled("cuda")
    with torch.autocast(device_type, dtype=torch.bfloat16):
        if legacy:
            torch.set_autocast_enabled("cuda", True)
        try:
            yield
        finally:
            if legacy:
                torch.set_autocast_enabled("cuda", False)


#: Reason given to a "1P" LayerNorm patched with its fp32-safe variant (see :func:`_fp32_safe_1p`).
FP32_SAFE_REASON = ("fp32-safe: under bf16 autocast the original rounds its input, 1 + w and bias to bf16 "
                    "before the LayerNorm; the patched layer computes in fp32 and returns the input dtype")


def _fp32_safe_1p(kind: str, mode: str, bias: bool, ranked: list[str], out: torch.Tensor, x32: torch.Tensor,
                  copy_: nn.Module, eps: float | None, shape: tuple[int, ...], channels_first: bool) -> bool:
    """The "1P" LayerNorm rule (``NemotronLayerNorm1P``): patch it as ``layer*(1+w)+b/after``.

    Like Gemma's ``rms*(1+w)/after``, the fp32 function is well defined: ``F.layer_norm(x.float(), 1 + w.float(),
    b.float()).to(x.dtype)``. Without autocast the original computes that (the "after" cast order reproduces it
    in step 2); under autocast it casts input, ``1 + w`` and bias to the autocast dtype first
    (``_cast_if_autocast_enabled``), so no variant reproduces it. The rule accepts the layer only when that is all the difference: the math is
    LayerNorm with ``1 + w`` and a bias, "after" matched without autocast, and under autocast the original
    returns the autocast dtype with values within bf16 rounding (``_HALF_TOL``) of the fp32 result.
    """
    if (kind, mode, bias) != ("layer", "one_plus_w", True) or "after" not in ranked or out.dtype != torch.bfloat16:
        return False
    v = NormVariant(kind, mode, bias, "after", channels_first)
    with torch.no_grad():
        mine = norm_forward(x32, v, copy_.weight, copy_.bias, eps, shape)
    return mine.dtype == torch.float32 and _close(mine, out, _HALF_TOL) < float("inf")


def probe_norm(module: nn.Module, seed: int = 0) -> ProbeResult:
    """Run ``module``'s original forward on probe inputs and name the variant it computes.

    The module itself is not modified: the probe runs on a deep copy with random weights.

    Example:
        >>> from transformers.models.llama.modeling_llama import LlamaRMSNorm
        >>> probe_norm(LlamaRMSNorm(16)).variant.name
        'rms*w/llama'
    """
    eps = norm_eps(module)
    weight, bias = _tensor_attr(module, "weight"), _tensor_attr(module, "bias")
    has_eps = any(isinstance(getattr(module, a, None), (int, float)) for a in EPS_ATTRS) \
        or (isinstance(module, getattr(nn, "RMSNorm", ())) and "eps" in vars(module))
    if not has_eps and (weight is not None or bias is not None):
        return ProbeResult(None, None, None, "no epsilon attribute")
    if weight is not None and weight.is_meta:
        return ProbeResult(None, eps, None, "parameters on the meta device")
    if weight is not None:
        shape = tuple(weight.shape)
    elif isinstance(getattr(module, "normalized_shape", None), (tuple, list, torch.Size)):
        shape = tuple(module.normalized_shape)
    else:
        shape = None
    if bias is not None and (weight is None or tuple(bias.shape) != shape):
        return ProbeResult(None, eps, shape, "bias without a weight of the same shape")
    dev = weight.device if weight is not None else torch.device("cpu")
    forward = original_class(module).forward
    g = torch.Generator(device="cpu").manual_seed(seed)
    probe_shape = shape or (16,)
    f32 = torch.float32  # explicit everywhere: the default dtype may be bf16 while a model is built
    try:
        # an observer set by the tick callback may reference the whole callback: do not copy it
        memo = {id(module.__dict__["tick_observer"]): None} if "tick_observer" in module.__dict__ else {}
        copy_ = copy.deepcopy(module, memo).to(device=dev, dtype=f32)
    except Exception as err:  # noqa: BLE001 - any module may fail to copy; it is then reported, not patched
        return ProbeResult(None, eps, shape, f"cannot copy for the probe: {err}")
    with torch.no_grad():
        if weight is not None:  # random, not all-ones or zeros: tells w from 1 + w and from no weight
            copy_.weight.copy_(torch.rand(shape, generator=g, dtype=f32) + 0.5)
        if bias is not None:
            copy_.bias.copy_(torch.randn(shape, generator=g, dtype=f32) * 0.5)

    def run(x: torch.Tensor, autocast: bool = False) -> torch.Tensor | None:
        try:
            with torch.no_grad(), (_autocast(dev.type) if autocast else torch.autocast(dev.type, enabled=False)):
                out = forward(copy_, x)
            return out if isinstance(out, torch.Tensor) else None
        except Exception:  # noqa: BLE001 - a forward that rejects the probe input is simply not a match
            return None

    # step 1: the math, in fp32. Rows at two scales: unit variance, and variance near eps (checks eps).
    unit = torch.randn(2, 3, 2, *probe_shape, generator=g, dtype=f32) + 0.5  # offset: LayerNorm != RMSNorm
    layouts = [False] + ([True] if len(probe_shape) == 1 else [])
    modes = ("w", "one_plus_w") if weight is not None else ("none",)
    math = None
    for trial_eps in ([eps] if has_eps else list(EPS_CANDIDATES)):
        base = unit.clone()
        base[1] *= (trial_eps or 1e-6) ** 0.5
        for channels_first in layouts:
            x = (base.movedim(-1, 1).contiguous() if channels_first else base).to(dev)
            out = run(x)
            if out is None:
                continue
            for kind in ("layer", "rms"):
                for mode in modes:
                    ref = reference_norm(x, kind, weight=copy_.weight if weight is not None else None,
                                         bias=copy_.bias if bias is not None else None, eps=trial_eps, weight_mode=mode,
                                         normalized_ndim=len(probe_shape), channels_first=channels_first)
                    if _close(out, ref, _FP32_TOL) < float("inf"):
                        math = (kind, mode, channels_first, x)
                        break
                if math:
                    break
            if math:
                break
        if math:
            eps = trial_eps
            break
    if math is None:
        tried = "" if has_eps else f" with any epsilon of {EPS_CANDIDATES} (it has no epsilon attribute)"
        return ProbeResult(None, eps, shape, "probe matched no reference formula (LayerNorm, RMSNorm, 1+w, "
                                             f"no-affine, channels-first){tried}")
    kind, mode, channels_first, x32 = math

    # step 2: the cast order, from half-precision inputs with fp32 and with bf16 weights.
    casts = ["llama", "after", "t5", "fp32"]
    # "native" (plain F.layer_norm / F.rms_norm, which autocast may cast) only for torch's own classes:
    # an eager Python formula is not touched by autocast, so it must map to an autocast-free variant.
    if mode != "one_plus_w" and isinstance(module, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        casts.insert(0, "native")
    settings = [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)]
    scores = {c: 0.0 for c in casts}
    ran = 0
    for x_dtype, w_dtype in settings:
        copy_.to(w_dtype)
        x = x32.to(x_dtype)
        out = run(x)
        if out is None:  # e.g. a dtype mix the original rejects: judge by the other settings
            continue
        ran += 1
        for c in casts:
            v = NormVariant(kind, mode, bias is not None, c, channels_first)
            with torch.no_grad():
                mine = norm_forward(x, v, getattr(copy_, "weight", None) if weight is not None else None,
                                    copy_.bias if bias is not None else None, eps, probe_shape)
            scores[c] += float("inf") if mine.dtype != out.dtype else _close(mine, out, _HALF_TOL)
    if not ran:
        return ProbeResult(None, eps, shape, "original forward fails on every half-precision probe input")
    ranked = sorted((c for c in casts if scores[c] < float("inf")), key=lambda c: scores[c])  # stable: ties keep
    if not ranked:                                                                           # the more native
        return ProbeResult(None, eps, shape, f"{kind} math matches but no known cast order reproduces the "
                                             f"original's half-precision output")

    # step 3: fp32 input and weights under bf16 autocast, where a layer may branch on is_autocast_enabled()
    copy_.to(f32)
    out = run(x32, autocast=True)
    best, mismatch = ranked[0], ""
    if out is not None:
        for c in ranked:
            v = NormVariant(kind, mode, bias is not None, c, channels_first)
            with torch.no_grad(), _autocast(dev.type):
                mine = norm_forward(x32, v, copy_.weight if weight is not None else None,
                                    copy_.bias if bias is not None else None, eps, probe_shape)
            if mine.dtype == out.dtype and _close(mine, out, _HALF_TOL) < float("inf"):
                best, mismatch = c, ""
                break
            mismatch = mismatch or (f"output dtype {mine.dtype} vs the original's {out.dtype}".replace("torch.", "")
                                    if mine.dtype != out.dtype else "values differ by more than 4 bf16 ulps")
        if mismatch and _fp32_safe_1p(kind, mode, bias is not None, ranked, out, x32, copy_, eps, probe_shape,
                                      channels_first):
            return ProbeResult(NormVariant(kind, mode, True, "after", channels_first), eps, shape, FP32_SAFE_REASON)
        if mismatch:
            return ProbeResult(None, eps, shape, f"{kind} math and cast order match without autocast, but no "
                                                 f"variant reproduces the original under bf16 autocast ({mismatch}; "
                                                 "the original branches on torch.is_autocast_enabled())")
    reason = "" if has_eps else f"eps {eps:g} inferred by the probe (no epsilon attribute)"
    return ProbeResult(NormVariant(kind, mode, bias is not None, best, channels_first), eps, shape, reason)
