"""Which modules are plausibly normalization layers: a structural test, no forward run (torch.nn only).

Shared by :mod:`tick_lightning.select` (the ``norm`` kind) and :mod:`tick_lightning.norms` (the candidates its
probe confirms). It sits outside ``norms`` so that ``select`` does not import the norms package, which itself
selects layers through ``select``: one direction, ``norms -> select -> norm_candidates``.
"""

from __future__ import annotations

import torch  # noqa: F401 - the doctests
from torch import nn

__all__ = ["EPS_ATTRS", "is_norm_candidate", "original_class"]

EPS_ATTRS = ("eps", "variance_epsilon", "epsilon", "layer_norm_eps", "rms_norm_eps", "norm_eps")


def original_class(module: nn.Module) -> type:
    """The class ``module`` had before patching (its own class when it is not patched).

    Example:
        >>> original_class(torch.nn.LayerNorm(4)) is torch.nn.LayerNorm
        True
    """
    return getattr(type(module), "_tick_original_class", type(module))


def is_norm_candidate(module: nn.Module) -> bool:
    """Cheap structural test: is ``module`` plausibly a LayerNorm/RMSNorm-like layer? No forward is run.

    Example:
        >>> is_norm_candidate(torch.nn.LayerNorm(4)), is_norm_candidate(torch.nn.Linear(4, 4))
        (True, False)
    """
    if isinstance(module, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm), nn.GroupNorm)):
        return True
    cls = original_class(module)
    name = cls.__name__
    tag = str(getattr(cls, "kernel_layer_name", "") or "")
    if not (name.endswith("Norm") or "LayerNorm" in name or "RMSNorm" in name or "Norm" in tag):
        return False
    if any(True for _ in module.children()):
        return False
    params = dict(module.named_parameters(recurse=False))
    if any(k not in ("weight", "bias") or p.dim() != 1 for k, p in params.items()):
        return False
    if any(hasattr(module, a) for a in EPS_ATTRS) or isinstance(module, nn.modules.batchnorm._NormBase):
        return True
    # no epsilon attribute: a parameter-free layer norm whose eps is hard-coded (OLMo's); the probe decides
    return not params and ("LayerNorm" in name or "RMSNorm" in name)
