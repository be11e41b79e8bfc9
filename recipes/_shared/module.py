"""The LightningModule base of the Hugging Face recipes (text, image, causal LM): the model built from the data,
activation checkpointing and PEFT, FSDP2 sharding, AdamW + warmup/cosine, and ``save_pretrained`` export; and
the two functions a module that is not a Hugging Face fine-tune calls itself (:func:`build_once` in ``setup``,
:func:`log_step_metric` in ``training_step``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import torch

from recipes._shared.adapters import PEFT_METHODS, apply_peft
from recipes._shared.errors import RecipeError
from recipes._shared.optim import check_layer_lr_decay, optimizer_param_groups, use_fused_optimizer
from recipes._shared.schedule import with_warmup_cosine
from recipes._shared.sharding import shard_for_strategy, unsharded_replica


class RecipeModule(L.LightningModule):
    """Base LightningModule of the recipes: a Hugging Face model built from the data, AdamW + warmup/cosine.

    Subclasses implement :meth:`build` (create ``self.model`` once the data is known: label count, tokenizer)
    and the steps. Use it in your own Trainer by calling ``module.build(datamodule)`` after
    ``datamodule.setup("fit")`` (``setup`` does it for you when the Trainer has the datamodule).
    """

    def __init__(self, lr: float = 5e-4, weight_decay: float = 0.01, warmup_ratio: float = 0.06,
                 peft: str = "none", merge_lora: bool = True, fused: Optional[bool] = None,
                 layer_lr_decay: float = 1.0, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        if peft not in PEFT_METHODS:
            raise RecipeError(f"--model.peft={peft!r} is not supported; choose one of {list(PEFT_METHODS)}.")
        if not (lr > 0):
            raise RecipeError(f"--model.lr={lr!r} must be > 0.")
        if not (0 <= warmup_ratio < 1):
            raise RecipeError(f"--model.warmup_ratio={warmup_ratio!r} must be in [0, 1).")
        check_layer_lr_decay(layer_lr_decay)  # here too, so a bad value fails before the model is loaded
        self.lr, self.weight_decay, self.warmup_ratio = lr, weight_decay, warmup_ratio
        self.layer_lr_decay = layer_lr_decay
        self.peft, self.merge_lora, self.fused = peft, merge_lora, fused
        self.gradient_checkpointing = gradient_checkpointing
        self.model: Optional[torch.nn.Module] = None
        self.preprocessor: Any = None  # tokenizer or image processor, saved with the model
        #: :meth:`build` makes the model on the meta device, reading no weights (set by the CLI on FSDP2 ranks > 0:
        #: rank 0's weights reach them when the model is sharded, so a job holds one full copy, not one per rank)
        self.build_on_meta = False

    # -- to implement
    def build(self, datamodule: L.LightningDataModule) -> None:
        """Create ``self.model`` (and ``self.preprocessor``) for this data; raise :class:`RecipeError` on mismatch."""
        raise NotImplementedError

    def prepare_model(self, model: torch.nn.Module, **peft_kwargs: Any) -> torch.nn.Module:
        """Training mode, activation checkpointing (``--model.gradient_checkpointing``) and PEFT for a loaded model."""
        model.train()  # from_pretrained returns eval mode; Lightning keeps module modes as they are
        if self.gradient_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise RecipeError(f"--model.gradient_checkpointing=true: {type(model).__name__} does not support it; "
                                  "use false.")
            # non-reentrant: works with frozen inputs (PEFT) and with FSDP2
            enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5 (the old name warns)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return apply_peft(model, self.peft, **peft_kwargs)

    def configure_model(self) -> None:
        """Under ``--trainer.strategy=fsdp2``: ``fully_shard`` each transformer block and the model."""
        shard_for_strategy(self)

    def setup(self, stage: str) -> None:
        build_once(self)

    # -- logging
    def log_step_metric(self, name: str, value: torch.Tensor, **kwargs: Any) -> None:
        """``self.log`` on the training steps whose metrics reach the loggers (see :func:`log_step_metric`)."""
        log_step_metric(self, name, value, **kwargs)

    # -- optimisation
    def configure_optimizers(self):
        groups = optimizer_param_groups(self, self.lr, self.weight_decay, self.layer_lr_decay)
        opt = torch.optim.AdamW(groups, lr=self.lr, fused=use_fused_optimizer(self, self.fused))
        return with_warmup_cosine(self.trainer, opt, self.warmup_ratio)

    # -- export
    def export_model(self, path: Union[str, os.PathLike], state_dict: Optional[dict] = None) -> Path:
        """``save_pretrained`` the Hugging Face model (LoRA merged when ``merge_lora``) with its preprocessor.

        ``state_dict``: the gathered weights of a sharded model (:func:`full_state_dict`), saved instead.
        """
        path = Path(path)
        model = self.model
        if state_dict is not None:
            model = unsharded_replica(model, state_dict)
        if self.peft != "none" and self.merge_lora and hasattr(model, "merge_and_unload"):
            import copy

            model = (model if state_dict is not None else copy.deepcopy(model)).merge_and_unload()
        model.save_pretrained(str(path))
        if self.preprocessor is not None:
            self.preprocessor.save_pretrained(str(path))
        return path


def build_once(module: L.LightningModule) -> None:
    """The ``setup`` of a recipe's module: ``module.build(datamodule)`` with the Trainer's datamodule, unless the
    model is built already (the CLI builds it before training, to check the input)."""
    if module.model is None:
        dm = module.trainer.datamodule if module._trainer is not None else None
        if dm is None:
            raise RecipeError(f"{type(module).__name__} needs its datamodule: call module.build(datamodule) first.")
        module.build(dm)


def log_step_metric(module: L.LightningModule, name: str, value: torch.Tensor, **kwargs: Any) -> None:
    """``module.log(name, value, **kwargs)`` on the training steps whose metrics Lightning sends to the loggers.

    Lightning writes step metrics every ``log_every_n_steps`` steps only, but ``self.log`` costs about
    0.5 ms of Python on every call (a few % of a small model's step). The loggers receive the same rows
    either way; the progress bar refreshes its value at the same rate.
    """
    # Lightning's own rule (private; when it is absent, log every step as plain self.log would)
    writes = getattr(getattr(module._trainer, "_logger_connector", None), "should_update_logs", True)
    if not (writes or module._trainer.fast_dev_run):
        return
    module.log(name, value, **kwargs)
