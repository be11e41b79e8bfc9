"""Attention blocks and the size of their logits: the early warning of attention-logit growth.

A transformer's attention logits ``q.k / sqrt(d)`` can grow step after step until softmax saturates and the
loss diverges (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training
instabilities"); they grow for many steps before the loss moves, and no gradient norm need show it. The
flight recorder's opt-in ``attn_logit`` series (``TickCallback(flight=["attn_logit"])``) is each block's
**logit scale** at every step:

    rms(q) * rms(k) * sqrt(head_dim)

the size ``|q| |k| / sqrt(head_dim)`` of a logit whose query and key align (``|q| = rms(q) sqrt(head_dim)`` per
head), over the step's training micro-batches (their max), from the outputs of the block's query and key
projections: one mean of squares each per forward, no extra matmul. It is before any rotary embedding (a
rotation keeps the norms) and any qk-norm inside the attention (whose output scale is its weight's).

``attention_blocks(model)`` finds the blocks by their projections' names, as Hugging Face models name them:

* separate projections, children of one module: ``query`` / ``key`` (BERT, ViT), ``q_proj`` / ``k_proj``
  (Llama, Mistral, Qwen, OPT, CLIP), ``q`` / ``k`` (T5), ``q_lin`` / ``k_lin`` (DistilBERT), ``to_q`` / ``to_k``,
  ``wq`` / ``wk``;
* one fused projection whose output is ``q | k | v`` in thirds of its last dimension: ``c_attn`` (GPT-2),
  ``qkv_proj``, ``qkv``, ``Wqkv``. (Layouts that interleave heads, such as GPT-NeoX's ``query_key_value``, are
  not split here: not found.)

The same series carries one more column where the model has an output head (``output_head``: ``lm_head``, a
``classifier``): the rms of its logits, whose growth saturates the softmax of the loss as the attention logits'
does the attention's (the output-logit divergence of Wortsman et al.; PaLM's z-loss keeps it down).

``head_dim`` is the block's own attribute (``head_dim``, ``attention_head_size``, ``head_size``), or its width
over its head count (``num_heads``, ``num_attention_heads``, ``n_head``, ``n_heads``); a block with neither is
left out (its scale would be off by an unknown factor).

Example:
    >>> from transformers import BertConfig, BertModel
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    >>> [(b.name, b.head_dim) for b in attention_blocks(model)]
    [('encoder.layer.0.attention.self', 16), ('encoder.layer.1.attention.self', 16)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

__all__ = ["AttentionBlock", "FUSED_QKV", "OUTPUT_HEADS", "QK_PAIRS", "attention_blocks", "output_head"]

#: (query, key) child names of one attention module
QK_PAIRS = (("query", "key"), ("q_proj", "k_proj"), ("q", "k"), ("q_lin", "k_lin"), ("to_q", "to_k"), ("wq", "wk"))
#: a child whose output is q | k | v in equal thirds of the last dimension
FUSED_QKV = ("c_attn", "qkv_proj", "qkv", "Wqkv")
#: the output head's name in a model without ``get_output_embeddings`` (a classifier)
OUTPUT_HEADS = ("classifier", "score", "qa_outputs", "lm_head", "head")
_HEAD_DIM = ("head_dim", "attention_head_size", "head_size")
_HEADS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
_WIDTH = ("embed_dim", "all_head_size", "hidden_size", "inner_dim")


@dataclass(frozen=True)
class AttentionBlock:
    """One attention block: ``name`` (the module holding the projections, as ``named_modules`` names it, cleaned),
    its query and key projection modules (``fused``: one module, ``key`` is it too) and ``head_dim``."""

    name: str
    query: nn.Module
    key: nn.Module
    fused: bool
    head_dim: int
    output: bool = False  # the model's output head (``output_head``): its logits' rms, no query or key

    @property
    def scale(self) -> float:
        return math.sqrt(self.head_dim)


def _head_dim(module: nn.Module) -> int | None:
    for attr in _HEAD_DIM:
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    heads = next((getattr(module, a) for a in _HEADS if isinstance(getattr(module, a, None), int)), None)
    width = next((getattr(module, a) for a in _WIDTH if isinstance(getattr(module, a, None), int)), None)
    if heads and width and width % heads == 0:
        return width // heads
    return None


def attention_blocks(model: nn.Module) -> list[AttentionBlock]:
    """Every attention block of ``model`` whose query and key projections the module docstring's names find, in
    module order; ``[]`` for a model without them (not an error)."""
    from tick_lightning.select import clean_name

    out = []
    for name, module in model.named_modules():
        children = dict(module.named_children())
        head_dim = None
        pair = next(((children[q], children[k]) for q, k in QK_PAIRS if q in children and k in children), None)
        fused = next((children[f] for f in FUSED_QKV if f in children), None) if pair is None else None
        if pair is None and fused is None:
            continue
        head_dim = _head_dim(module)
        if head_dim is None:
            continue
        query, key = pair if pair is not None else (fused, fused)
        out.append(AttentionBlock(clean_name(name), query, key, pair is None, head_dim))
    return out


def output_head(model: nn.Module) -> AttentionBlock | None:
    """The model's output head as a column of the same series: its logits' rms (``output=True``, scale 1). The
    first Hugging Face model inside ``model`` names it (``get_output_embeddings()``: ``lm_head``), else its
    first ``nn.Linear`` child named as in ``OUTPUT_HEADS`` (``classifier``, ``score``, ...); ``None`` for a
    model without one (not an error).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> output_head(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))).name
        'lm_head'
    """
    from tick_lightning.select import clean_name

    names = {id(m): clean_name(n) for n, m in model.named_modules()}
    for _, module in model.named_modules():
        get = getattr(module, "get_output_embeddings", None)
        if callable(get):
            try:
                head = get()
            except (AttributeError, NotImplementedError):
                head = None
            if isinstance(head, nn.Linear) and id(head) in names:
                return AttentionBlock(names[id(head)], head, head, False, 1, output=True)
        children = dict(module.named_children())
        head = next((children[h] for h in OUTPUT_HEADS if isinstance(children.get(h), nn.Linear)), None)
        if head is not None:
            return AttentionBlock(names[id(head)], head, head, False, 1, output=True)
    return None
