"""Select parameters and modules by glob pattern over their names, or by kind.

A selector is a string or a list of strings. Each string is a glob over the full name or any dotted
suffix of it (``"encoder.layer.*.attention.*"`` matches ``model.bert.encoder.layer.0.attention...``), a kind (``"norm"``, ``"attention"``, ``"embedding"``, ``"lora"``,
``"linear"``, ``"all"``), or either prefixed with ``!`` to exclude. Included sets are unioned, then
exclusions removed. A selector that matches nothing is an error that lists the closest names.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    >>> [n for n, _ in select_parameters(model, ["norm", "2.*"])]
    ['1.weight', '1.bias', '2.weight', '2.bias']
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Sequence

from torch import nn

from tick_lightning.norm_candidates import is_norm_candidate

__all__ = ["KINDS", "SelectionError", "Selector", "clean_name", "closest_names", "select_modules", "select_parameters"]

Selector = str | Sequence[str] | None
KINDS = ("all", "norm", "attention", "embedding", "lora", "linear")


class SelectionError(ValueError):
    """A selector that matches nothing or names an unknown kind."""


#: Components that wrappers insert into parameter names (``torch.compile``, FSDP1, activation checkpointing).
_WRAPPERS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def clean_name(name: str) -> str:
    """``name`` as the user's model spells it: wrapper components removed.

    Example:
        >>> clean_name("model._orig_mod.encoder.layer.0._checkpoint_wrapped_module.weight")
        'model.encoder.layer.0.weight'
    """
    for wrapper in _WRAPPERS:
        name = name.replace(wrapper, "")
    return name.removesuffix("._orig_mod")


def _kind_hint(pattern: str) -> str:
    close = difflib.get_close_matches(pattern.strip("*.?"), KINDS, n=1, cutoff=0.6)  # attn: attention, not nomatch: norm
    return f" Did you mean the kind {close[0]!r}?" if close else ""


def closest_names(pattern: str, names: Iterable[str], n: int = 5) -> list[str]:
    names = list(names)
    stripped = pattern.replace("*", "").replace("?", "")
    close = difflib.get_close_matches(pattern, names, n=n, cutoff=0.3)
    if len(close) < n and stripped:
        close += [c for c in difflib.get_close_matches(stripped, names, n=n, cutoff=0.3) if c not in close]
    return close[:n] or names[:n]


def _is_attention(module_name: str, module: nn.Module) -> bool:
    if "attention" in type(module).__name__.lower():
        return True
    return any(seg in ("attn", "attention", "self_attn", "self_attention", "crossattention") or "attn" in seg
               for seg in module_name.lower().split("."))


def _module_kind(kind: str, module_name: str, module: nn.Module) -> bool:
    if kind == "all":
        return True
    if kind == "norm":
        return is_norm_candidate(module)
    if kind == "embedding":
        return isinstance(module, nn.Embedding) or type(module).__name__.endswith("Embedding")
    if kind == "linear":
        # transformers' Conv1D (GPT-2) is a Linear with a transposed weight
        return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
    if kind == "attention":
        return _is_attention(module_name, module)
    if kind == "lora":
        return "lora_" in module_name
    raise SelectionError(f"Unknown kind {kind!r}; valid kinds: {', '.join(KINDS)}.")


def _as_list(selector: Selector) -> list[str]:
    if selector is None:
        return ["all"]
    if isinstance(selector, str):
        return [s.strip() for s in selector.split(",") if s.strip()] if "," in selector else [selector]
    out = list(selector)
    for s in out:
        if not isinstance(s, str):
            raise SelectionError(f"Selector entry {s!r} is not a string; use glob patterns or kinds {KINDS}.")
    return out


def _select(items: list[tuple[str, object, str, nn.Module]], selector: Selector, what: str) -> list[tuple[str, object]]:
    """``items``: (name, object, owning module name, owning module)."""
    names = [name for name, _, _, _ in items]
    included: set[str] = set()
    excluded: set[str] = set()
    patterns = _as_list(selector)
    if not patterns:
        raise SelectionError(f"Empty {what} selector; use 'all', a kind ({', '.join(KINDS)}) or a glob pattern.")
    only_exclusions = all(p.startswith("!") for p in patterns)
    if only_exclusions:
        included = set(names)
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        if body in KINDS:
            hit = {name for name, _, mname, module in items if _module_kind(body, mname, module)}
        else:
            # a pattern may omit leading components: "encoder.*" also matches "model.bert.encoder.*"
            hit = {name for name in names if fnmatch.fnmatchcase(name, body) or fnmatch.fnmatchcase(name, "*." + body)}
        if not hit and not negate:
            raise SelectionError(
                f"{what.capitalize()} selector {pattern!r} matches nothing. Closest {what} names: "
                f"{closest_names(body, names)}; kinds: {', '.join(KINDS)}.{_kind_hint(body)}"
            )
        (excluded if negate else included).update(hit)
    chosen = included - excluded
    return [(name, obj) for name, obj, _, _ in items if name in chosen]


def select_parameters(model: nn.Module, selector: Selector = None, *, trainable_only: bool = False,
                      what: str = "parameter") -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs of ``model`` chosen by ``selector`` (``None`` means all), in model order."""
    items = []
    for mname, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if trainable_only and not param.requires_grad:
                continue
            items.append((clean_name(f"{mname}.{pname}" if mname else pname), param, clean_name(mname), module))
    # a shared (tied) parameter appears under its first name only, as model.named_parameters() does
    seen: set[int] = set()
    unique = []
    for item in items:
        if id(item[1]) not in seen:
            seen.add(id(item[1]))
            unique.append(item)
    return _select(unique, selector, what)


def select_modules(model: nn.Module, selector: Selector = None, *, what: str = "module") -> list[tuple[str, nn.Module]]:
    """``(name, module)`` pairs of ``model`` chosen by ``selector`` (globs over module names, or kinds)."""
    items = [(clean_name(name), module, clean_name(name), module) for name, module in model.named_modules()
             if name and clean_name(name)]
    return _select(items, selector, what)
