"""Loading Hugging Face models, tokenizers and processors from a hub name or a local directory, or building a model
from a config dict; an unreachable hub or a missing local path becomes one clear :class:`RecipeError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from recipes._shared.errors import RecipeError

HUB_UNREACHABLE = "the hub is not reachable (HF_HUB_OFFLINE=1 or no network); pass a local path: {flag}=/path/to/dir"


def hub_offline() -> bool:
    """Whether the environment forbids hub access (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


def from_pretrained_or_error(cls: Any, name: str, *, flag: str = "--model.checkpoint", what: str = "checkpoint",
                             **kwargs: Any) -> Any:
    """``cls.from_pretrained(name, **kwargs)`` that turns an unreachable hub name into a clear :class:`RecipeError`.

    Example:
        >>> from transformers import AutoConfig
        >>> os.environ["HF_HUB_OFFLINE"] = "1"
        >>> from_pretrained_or_error(AutoConfig, "no-such-org/no-such-model")  # doctest: +SKIP
        Traceback (most recent call last):
        recipes._shared.errors.RecipeError: cannot load 'no-such-org/no-such-model': the hub is not reachable (...)
    """
    local = Path(name).expanduser()
    if not local.exists() and looks_like_path(name):
        raise RecipeError(f"{flag}={name!r}: no such local directory; pass an existing directory (with config.json, "
                          "as written by save_pretrained) or a hub name such as 'org/model'.")
    if local.exists():
        try:
            return cls.from_pretrained(str(local), **kwargs)
        except (OSError, ValueError) as err:
            raise RecipeError(f"cannot load {what} from the local path {str(local)!r}: {err}") from err
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        text = str(err)
        offline_like = hub_offline() or any(s in text for s in (
            "offline", "connect", "Connection", "resolve", "Max retries", "couldn't connect", "not reachable"))
        if offline_like:
            raise RecipeError(f"cannot load {name!r}: " + HUB_UNREACHABLE.format(flag=flag)) from err
        raise RecipeError(f"cannot load {what} {name!r} with {getattr(cls, '__name__', cls)}: {text}") from err


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id (``org/model`` or ``model``).

    Example:
        >>> [looks_like_path(n) for n in ("bert-base-uncased", "google/vit-base", "./ckpt", "/data/m", "a/b/c")]
        [False, False, True, True, True]
    """
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or name.endswith("/")
            or os.sep != "/" and os.sep in name)


def load_pretrained_or_config(auto_cls: Any, checkpoint: Optional[str] = None, config: Optional[dict] = None,
                              *, flag: str = "--model.checkpoint", meta: bool = False, **kwargs: Any) -> Any:
    """Load ``auto_cls`` from a checkpoint (hub name or local dir), or build it from a config dict.

    ``config`` needs ``model_type`` (``"bert"``, ``"vit"``, ``"llama"`` ...) when there is no checkpoint;
    ``kwargs`` (``num_labels``, ``vocab_size`` ...) go to the config (from scratch) or to ``from_pretrained``.
    ``meta=True`` builds the same model on the meta device without reading (or initializing) any weight: only
    the checkpoint's config is read. Under FSDP2 every rank but 0 does this; rank 0's weights reach them
    when the model is sharded (:func:`recipes._shared.sharding.shard_model`).

    Example:
        >>> from transformers import AutoModelForSequenceClassification as M
        >>> m = load_pretrained_or_config(M, None, dict(model_type="bert", hidden_size=32, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=64, vocab_size=50), num_labels=3)
        >>> m.config.num_labels
        3
    """
    from transformers import AutoConfig

    if checkpoint:
        if config:
            kwargs = {**config, **kwargs}
            kwargs.pop("model_type", None)
        if meta:  # the config only; kwargs that are not config fields (ignore_mismatched_sizes) are left unused
            hf_config, _ = from_pretrained_or_error(AutoConfig, checkpoint, flag=flag, return_unused_kwargs=True,
                                                    **kwargs)
            return _on_meta(auto_cls, hf_config)
        return from_pretrained_or_error(auto_cls, checkpoint, flag=flag, **kwargs)
    if not config or "model_type" not in config:
        raise RecipeError(
            f"no checkpoint and no model config: pass {flag}=<hub name or local dir>, or --model.model_config with "
            "a 'model_type' (e.g. {'model_type': 'bert', 'hidden_size': 64, ...})."
        )
    cfg = dict(config)
    model_type = cfg.pop("model_type")
    try:
        hf_config = AutoConfig.for_model(model_type, **{**cfg, **kwargs})
    except ValueError as err:
        raise RecipeError(f"model_type {model_type!r} in --model.model_config is not known: {err}") from err
    return _on_meta(auto_cls, hf_config) if meta else auto_cls.from_config(hf_config)


def _on_meta(auto_cls: Any, hf_config: Any) -> Any:
    import torch

    with torch.device("meta"):  # parameters and buffers: shapes and dtypes only
        return auto_cls.from_config(hf_config)
