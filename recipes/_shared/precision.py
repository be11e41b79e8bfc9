"""The default ``--trainer.precision``: ``bf16-mixed`` / ``16-mixed`` / ``32-true`` from the hardware, decided
without initializing CUDA (so Lightning can still fork ranks).

Example:
    >>> from recipes._shared.precision import auto_precision
    >>> auto_precision() in ("32-true", "bf16-mixed", "16-mixed")
    True
"""

from __future__ import annotations

from typing import Optional

import torch


def auto_precision() -> str:
    """``bf16-mixed`` on GPUs with native bf16 (compute capability >= 8), ``16-mixed`` on older GPUs, ``32-true``
    without a GPU.

    It runs while the command line is parsed, before Lightning starts (or forks) the other ranks, so it must not
    initialize CUDA: ``torch.cuda.is_available`` is NVML-based under Lightning (``PYTORCH_NVML_BASED_CUDA_CHECK=1``),
    and the compute capability comes from NVML too. Only when CUDA is already initialized does it ask torch
    (``is_bf16_supported(including_emulation=False)``: V100/T4 emulate bf16 slowly, so they get ``16-mixed``).

    Example:
        >>> auto_precision() if not torch.cuda.is_available() else "32-true"
        '32-true'
    """
    if not torch.cuda.is_available():
        return "32-true"
    if torch.version.hip:
        return "bf16-mixed"
    if torch.cuda.is_initialized():
        return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "16-mixed"
    capability = nvml_compute_capability()
    if capability is None:  # no NVML: do not guess bf16
        return "16-mixed"
    return "bf16-mixed" if capability[0] >= 8 else "16-mixed"


def nvml_compute_capability(device: int = 0) -> Optional[tuple[int, int]]:
    """The compute capability of CUDA device ``device`` (after ``CUDA_VISIBLE_DEVICES``) read from NVML, without
    initializing CUDA in this process (so Lightning can still fork ranks); None when NVML is unavailable."""
    from ctypes import CDLL, byref, c_int, c_void_p

    try:
        nvml = CDLL("libnvidia-ml.so.1")
        index = getattr(torch.cuda, "_get_nvml_device_index", lambda d: d)(device)  # maps CUDA_VISIBLE_DEVICES
        handle, major, minor = c_void_p(), c_int(), c_int()
        if (nvml.nvmlInit_v2() != 0 or nvml.nvmlDeviceGetHandleByIndex_v2(index, byref(handle)) != 0
                or nvml.nvmlDeviceGetCudaComputeCapability(handle, byref(major), byref(minor)) != 0):
            return None
    except (OSError, RuntimeError, ValueError):
        return None
    return major.value, minor.value
