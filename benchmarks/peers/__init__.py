"""Independent peer implementations of published gradient-spike defences, for side-by-side benchmarks.

- :mod:`benchmarks.peers.zclip`: ZClip (Kumar et al., arXiv 2504.02507), z-score clipping of the global norm.
- :mod:`benchmarks.peers.adagc`: AdaGC (Wang et al., arXiv 2502.11034), per-tensor clipping against an EMA.
- :mod:`benchmarks.peers.olmo_skip`: OLMo-core's ``SkipStepAdamW`` (skip a step whose loss or grad norm is
  ``sigma_factor`` standard deviations above a rolling history), driven from Lightning.

They are references, written to behave like the authors' code (host-side ``.item()`` reads included), not
products. ``olmo_skip`` needs ``ai2-olmo-core`` and is not imported here, so the other two work without it.
"""

from .adagc import AdaGC, AdaGCCallback
from .zclip import ZClip, ZClipCallback

__all__ = ["AdaGC", "AdaGCCallback", "ZClip", "ZClipCallback"]
