"""Find normalization layers. (Foundation stub: cheap candidate test; the norm-patching work adds the probe.)"""

from __future__ import annotations

from torch import nn

EPS_ATTRS = ("eps", "variance_epsilon", "epsilon", "layer_norm_eps", "rms_norm_eps", "norm_eps")


def is_norm_candidate(module: nn.Module) -> bool:
    """Cheap structural test: is ``module`` plausibly a LayerNorm/RMSNorm-like layer? No forward is run."""
    if isinstance(module, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm), nn.GroupNorm)):
        return True
    name = type(module).__name__
    if not (name.endswith("Norm") or "LayerNorm" in name or "RMSNorm" in name):
        return False
    if any(True for _ in module.children()):
        return False
    params = dict(module.named_parameters(recurse=False))
    if any(k not in ("weight", "bias") or p.dim() != 1 for k, p in params.items()):
        return False
    return any(hasattr(module, a) for a in EPS_ATTRS) or isinstance(module, nn.modules.batchnorm._NormBase)
