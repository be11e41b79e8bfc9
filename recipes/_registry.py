"""The recipes ``tick-lightning run`` / ``ls`` know: name -> module, and their shipped configs.

An explicit list (as torchtune's ``_recipe_registry.py``): a new recipe is one line here. Importing this module
imports no recipe code; ``tick-lightning run <name>`` imports ``RECIPES[name]`` and calls its ``main(args)``.

Example:
    >>> RECIPES["causal_lm"]
    'recipes.causal_lm'
    >>> [p.name for p in configs("causal_lm")][:1]
    ['causal_lm_gpt2_lora.yaml']
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["RECIPES", "CONFIG_DIR", "configs"]

RECIPES: dict[str, str] = {
    "text_classification": "recipes.text_classification",
    "image_classification": "recipes.image_classification",
    "causal_lm": "recipes.causal_lm",
    "sequential_recommendation": "recipes.sequential_recommendation",
}

#: ``<recipe>.yaml`` and ``<recipe>_<variant>.yaml`` belong to ``<recipe>``
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def configs(name: str) -> list[Path]:
    """The shipped configs of recipe ``name`` (the longest matching recipe name owns a file)."""
    owners = sorted(RECIPES, key=len, reverse=True)
    out = []
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        owner = next((r for r in owners if path.stem == r or path.stem.startswith(r + "_")), None)
        if owner == name:
            out.append(path)
    return out
