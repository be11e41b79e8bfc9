"""Optimizer policy of the recipes: fused Adam/AdamW when it is safe, and AdamW parameter groups (no weight decay
for biases and norms, layer-wise lr decay).
"""

from __future__ import annotations

import re
from typing import Optional

import lightning as L
import torch

from recipes._shared.errors import RecipeError


def use_fused_optimizer(module: L.LightningModule, requested: Optional[bool] = None) -> bool:
    """Whether to build Adam/AdamW with ``fused=True`` (one kernel per step instead of a Python loop per tensor).

    ``requested=None`` (``--model.fused`` left unset) decides automatically, as the Hugging Face Trainer does
    with its default ``adamw_torch_fused``: fused when every trainable parameter is a plain floating tensor on
    CPU or CUDA, except

    - under ``16-mixed``: a fused step unscales gradients inside ``step``, so Lightning cannot unscale them
      before ``on_before_optimizer_step``, and clipping and the ticks' gradient statistics would see scaled
      gradients;
    - under any ``*-mixed`` precision with gradient clipping: Lightning's AMP plugin refuses to clip for an
      optimizer that could unscale internally;
    - under DeepSpeed, which brings its own optimizer handling.

    Example:
        >>> use_fused_optimizer(L.LightningModule(), requested=False)
        False
    """
    if requested is False:
        return False
    trainer = module._trainer
    precision = str(trainer.precision) if trainer is not None else "32-true"
    clipping = bool(getattr(trainer, "gradient_clip_val", None))
    reason = None
    if precision in ("16-mixed", "16"):
        reason = "the fp16 gradient scaler must unscale before clipping and tick statistics"
    elif precision in ("bf16-mixed", "bf16") and clipping:
        reason = "Lightning's AMP plugin does not clip gradients for a fused optimizer"
    if requested:
        if reason:
            raise RecipeError(f"--model.fused=true does not work with --trainer.precision={precision}"
                              f"{' and gradient clipping' if clipping else ''}: {reason}; use --model.fused=false.")
        return True
    deepspeed = trainer is not None and type(trainer.strategy).__name__.startswith("DeepSpeed")
    params = [p for p in module.parameters() if p.requires_grad]
    plain = all(type(p.data) is torch.Tensor and p.is_floating_point() and p.device.type in ("cpu", "cuda")
                for p in params)
    return bool(params) and plain and reason is None and not deepspeed


# Numbered transformer blocks in Hugging Face parameter names: BERT/ViT ``encoder.layer.3.``, Llama ``layers.3.``,
# GPT-2 ``h.3.``, timm-style ``blocks.3.`` (PEFT prefixes such as ``base_model.model.`` do not matter).
_BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")
# Below the blocks: any ``*embed*`` module (``embeddings``, ``embed_tokens``) and GPT-2's ``wte``/``wpe``.
_EMBEDDING_NAMES = ("wte", "wpe")


def check_layer_lr_decay(layer_lr_decay: float) -> None:
    """Raise :class:`RecipeError` unless ``0 < layer_lr_decay <= 1``."""
    if not (0 < layer_lr_decay <= 1):
        raise RecipeError(f"--model.layer_lr_decay={layer_lr_decay!r} must be in (0, 1]; 1 turns it off.")


def optimizer_param_groups(module: torch.nn.Module, lr: float, weight_decay: float,
                           layer_lr_decay: float = 1.0) -> list[dict]:
    """AdamW parameter groups: no weight decay for biases and norm weights, and layer-wise lr decay (LLRD).

    With ``layer_lr_decay`` d < 1 and L numbered blocks, block i (0-based) trains at ``lr * d**(L - i)``,
    the embeddings at ``lr * d**(L + 1)`` and everything above the blocks (pooler, head, final norm) at ``lr``:
    the lower, more general layers move less (the ELECTRA / BEiT fine-tuning recipe). Frozen parameters are left out.

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> m = BertForSequenceClassification(BertConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        ...                                              intermediate_size=8, vocab_size=10))
        >>> sorted({round(g["lr"], 4) for g in optimizer_param_groups(m, 1.0, 0.01, layer_lr_decay=0.5)})
        [0.125, 0.25, 0.5, 1.0]
    """
    check_layer_lr_decay(layer_lr_decay)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    blocks = {n: int(m.group(1)) for n, _ in named if (m := _BLOCK_INDEX.search(n))}
    num_blocks = max(blocks.values(), default=-1) + 1
    if layer_lr_decay < 1 and num_blocks == 0:
        raise RecipeError(f"--model.layer_lr_decay={layer_lr_decay} needs numbered transformer blocks "
                          "(names like 'encoder.layer.0.' or 'layers.0.'), and this model has none; use 1.0.")

    def depth(name: str) -> int:  # 0 = embeddings, 1..L = blocks, L + 1 = above the blocks
        if name in blocks:
            return blocks[name] + 1
        parts = name.lower().split(".")
        return 0 if any("embed" in q or q in _EMBEDDING_NAMES for q in parts) else num_blocks + 1

    groups: dict[tuple[int, bool], dict] = {}
    for name, p in named:
        no_decay = p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")
        d = depth(name) if layer_lr_decay < 1 else num_blocks + 1
        g = groups.setdefault((d, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                              "lr": lr * layer_lr_decay ** (num_blocks + 1 - d)})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]
