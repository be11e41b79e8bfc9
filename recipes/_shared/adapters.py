"""Parameter-efficient fine-tuning (``peft``): ``--model.peft`` = ``none``, ``lora`` or ``ln_tuning``."""

from __future__ import annotations

from typing import Any

import torch

from recipes._shared.errors import RecipeError

PEFT_METHODS = ("none", "lora", "ln_tuning")


def apply_peft(model: torch.nn.Module, method: str = "none", **kw: Any) -> torch.nn.Module:
    """Wrap ``model`` for parameter-efficient fine-tuning: ``"none"``, ``"lora"`` or ``"ln_tuning"`` (``peft``).

    Keyword arguments go to ``peft.LoraConfig`` / ``peft.LNTuningConfig`` (``r``, ``lora_alpha``,
    ``target_modules``, ``modules_to_save``, ``task_type`` ...). LoRA targets ``"all-linear"`` by default.

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> m = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=64))
        >>> p = apply_peft(m, "lora", r=4, task_type="SEQ_CLS")
        >>> any("lora_A" in n for n, _ in p.named_parameters())
        True
    """
    if method not in PEFT_METHODS:
        raise RecipeError(f"peft method {method!r} is not supported; choose one of {list(PEFT_METHODS)}.")
    if method == "none":
        return model
    import peft

    kw = {k: v for k, v in kw.items() if v is not None}
    if method == "lora":
        kw.setdefault("target_modules", "all-linear")
        return peft.get_peft_model(model, peft.LoraConfig(**kw))
    kw.pop("r", None), kw.pop("lora_alpha", None), kw.pop("lora_dropout", None)
    return peft.get_peft_model(model, peft.LNTuningConfig(**kw))
