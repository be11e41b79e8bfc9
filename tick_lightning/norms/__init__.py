"""Normalization-layer patching: detect every LayerNorm/RMSNorm variant by behaviour, run it through fused
kernels with fp32 statistics and the original's output dtype, observe its inputs, and undo it exactly.

Example:
    >>> import torch
    >>> from tick_lightning.norms import patched_norms
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    >>> with patched_norms(model) as report:
    ...     y = model(torch.randn(2, 4))
    >>> report.patched[0].name
    '1'
"""

from tick_lightning.norms.detect import is_norm_candidate, probe_norm
from tick_lightning.norms.modules import NormPatchSpec, is_patched
from tick_lightning.norms.ops import NormVariant, norm_forward
from tick_lightning.norms.patch import (
    KERNELS,
    NormLayerInfo,
    NormPatchReport,
    find_norms,
    iter_patched_norms,
    patch_norms,
    patched_norms,
    unpatch_norms,
)
from tick_lightning.norms.reference import reference_norm

__all__ = [
    "KERNELS", "NormLayerInfo", "NormPatchReport", "NormPatchSpec", "NormVariant", "find_norms", "is_norm_candidate",
    "is_patched", "iter_patched_norms", "norm_forward", "patch_norms", "patched_norms", "probe_norm",
    "reference_norm", "unpatch_norms",
]
