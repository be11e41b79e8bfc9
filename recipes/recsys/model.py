"""Next-item prediction on a Hugging Face transformer backbone fed through ``inputs_embeds``.

- ``gpt2`` (causal, pre-LayerNorm): SASRec style. Position t sees items <= t and predicts item t + 1.
- ``bert`` (bidirectional, post-LayerNorm): BERT4Rec style. Random items are replaced by a mask item
  and predicted from both sides; at evaluation a mask item is appended after the history.

Item embeddings (row 0 = padding item, row ``num_items + 1`` = mask item) are shared between input
and output: the score of item ``i`` at a position is ``h . E[i]`` (tied, as SASRec and BERT4Rec).

Any backbone given by checkpoint or config works when its ``AutoModel`` takes ``inputs_embeds`` and
``attention_mask`` and returns ``last_hidden_state``; the model types known to fit are listed in
``CAUSAL`` and ``BIDIRECTIONAL``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BACKBONES", "BIDIRECTIONAL", "CAUSAL", "INITS", "LOSSES", "SeqRecModel", "build_backbone"]

BACKBONES = ("gpt2", "bert")
LOSSES = ("bce", "softmax", "sampled_softmax")
#: ``backbone``: the backbone's own initialisation (GPT-2/BERT: normal(0.02)); ``xavier``: Xavier-normal for
#: every backbone weight with >= 2 dimensions (projections, position embeddings), as SASRec.pytorch does
INITS = ("backbone", "xavier")
#: model types that are run causally (position t predicts item t + 1)
CAUSAL = ("gpt2", "gpt_neo", "gpt_neox", "gptj", "llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "opt")
#: model types that are run bidirectionally with a mask item (cloze)
BIDIRECTIONAL = ("bert", "roberta", "distilbert", "electra", "albert", "xlm-roberta", "megatron-bert")


def build_backbone(
    backbone: str = "gpt2",
    checkpoint: str | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 1,
    intermediate_size: int | None = None,
    dropout: float = 0.2,
    max_len: int = 50,
    activation: str = "relu",
) -> tuple[nn.Module, bool]:
    """Build the backbone; returns ``(model, causal)``.

    ``checkpoint`` (a local directory, or a hub name when online) overrides the size arguments: a
    directory with weights is loaded, a directory with only ``config.json`` is built from the config.

    >>> m, causal = build_backbone("gpt2", hidden_size=32, num_layers=1, max_len=8)
    >>> type(m).__name__, causal
    ('GPT2Model', True)
    """
    from transformers import AutoConfig, AutoModel, BertConfig, BertModel, GPT2Config, GPT2Model

    if checkpoint is not None:
        config = AutoConfig.from_pretrained(checkpoint)
        kind = config.model_type
        if kind not in CAUSAL + BIDIRECTIONAL:
            raise ValueError(
                f"backbone model type {kind!r} (from {checkpoint!r}) is not supported for sequential "
                f"recommendation; causal types: {CAUSAL}; bidirectional types: {BIDIRECTIONAL}"
            )
        try:
            model = AutoModel.from_pretrained(checkpoint)
        except OSError:  # a config without weights: build it (random init)
            model = AutoModel.from_config(config)
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if limit is not None and limit < max_len:
            raise ValueError(f"max_len={max_len} exceeds the backbone's {limit} positions; lower --model.max_len")
        return model, kind in CAUSAL
    if backbone not in BACKBONES:
        raise ValueError(f"backbone {backbone!r} is not supported; choose one of {BACKBONES} "
                         f"(or pass --model.checkpoint=<dir or hub name>)")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
    inner = intermediate_size or hidden_size  # SASRec's point-wise FFN is hidden -> hidden -> hidden
    if backbone == "gpt2":
        cfg = GPT2Config(vocab_size=1, n_positions=max_len, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
                         n_inner=inner, activation_function=activation, resid_pdrop=dropout, embd_pdrop=dropout,
                         attn_pdrop=dropout, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return GPT2Model(cfg), True
    cfg = BertConfig(vocab_size=1, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                     intermediate_size=inner, hidden_act=activation, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout, max_position_embeddings=max_len, type_vocab_size=1,
                     pad_token_id=0)
    return BertModel(cfg, add_pooling_layer=False), False


class SeqRecModel(nn.Module):
    """Item embeddings + a HF backbone; ``scores`` ranks all items, ``loss`` trains with bce/softmax/sampled_softmax.

    >>> m = SeqRecModel(num_items=20, hidden_size=16, num_layers=1, max_len=6)
    >>> m.scores(torch.tensor([[0, 0, 3, 4, 5, 6]])).shape  # [batch, num_items + 1], column 0 = padding
    torch.Size([1, 21])
    """

    def __init__(
        self,
        num_items: int,
        backbone: str = "gpt2",
        checkpoint: str | None = None,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 1,
        intermediate_size: int | None = None,
        dropout: float = 0.2,
        max_len: int = 50,
        activation: str = "relu",
        mask_prob: float = 0.2,
        init: str = "backbone",
    ):
        super().__init__()
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        if init not in INITS:
            raise ValueError(f"init {init!r} is not supported; choose one of {INITS}")
        if init == "xavier" and checkpoint is not None:
            raise ValueError(f"init='xavier' would overwrite the weights of checkpoint {checkpoint!r}; "
                             "use init='backbone' with a checkpoint")
        self.backbone, self.causal = build_backbone(backbone, checkpoint, hidden_size, num_layers, num_heads,
                                                    intermediate_size, dropout, max_len, activation)
        if init == "xavier":
            with torch.no_grad():
                for p in self.backbone.parameters():
                    if p.dim() >= 2:
                        nn.init.xavier_normal_(p)
        d = self.backbone.config.hidden_size
        self.num_items, self.max_len, self.mask_prob = num_items, max_len, mask_prob
        self.mask_item = num_items + 1
        self.item_emb = nn.Embedding(num_items + 2, d, padding_idx=0)
        nn.init.xavier_normal_(self.item_emb.weight)  # as SASRec.pytorch; keeps the padding row zero below
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.scale = math.sqrt(d)  # SASRec scales item embeddings by sqrt(d) before adding positions

    def hidden(self, seq: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[B, L, d]`` for left-padded item ids ``[B, L]`` (0 = padding)."""
        mask = (seq != 0).long()
        out = self.backbone(inputs_embeds=self.item_emb(seq) * self.scale, attention_mask=mask)
        return out.last_hidden_state

    def last_hidden(self, seq: torch.Tensor) -> torch.Tensor:
        """The representation that predicts the item after the history ``seq`` (``[B, max_len]``)."""
        if not self.causal:  # append the mask item and read its position
            seq = torch.cat([seq[:, 1:], torch.full_like(seq[:, :1], self.mask_item)], dim=1)
        return self.hidden(seq)[:, -1]

    def item_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Scores ``[..., num_items + 1]`` of every item (column 0, the padding item, is -inf)."""
        logits = h @ self.item_emb.weight[: self.num_items + 1].T
        return logits.index_fill(-1, torch.tensor([0], device=h.device), float("-inf"))

    def scores(self, seq: torch.Tensor) -> torch.Tensor:
        """Scores of every item as the next item after ``seq``: ``[B, num_items + 1]``."""
        return self.item_logits(self.last_hidden(seq))

    def training_inputs(self, seq: torch.Tensor, neg: torch.Tensor, generator: torch.Generator | None = None):
        """From a ``[B, max_len + 1]`` training row: (input ids, target ids with 0 = no loss, negatives)."""
        if self.causal:
            inp, tgt, neg = seq[:, :-1], seq[:, 1:], neg[:, 1:]
            tgt = tgt * (inp != 0)  # SASRec: no target at positions whose input is padding
            return inp, tgt, neg
        items, neg = seq[:, 1:], neg[:, 1:]
        real = items != 0
        draw = torch.rand(items.shape, device=items.device, generator=generator) < self.mask_prob
        masked = draw & real
        # every row trains on >= 1 position: rows with none mask their last item (the evaluation case)
        none = ~masked.any(1)
        masked[:, -1] |= none & real[:, -1]
        inp = torch.where(masked, torch.full_like(items, self.mask_item), items)
        return inp, items * masked, neg

    def loss(self, seq: torch.Tensor, neg: torch.Tensor, loss: str = "bce", num_negatives: int = 100,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Training loss of a batch of ``[B, max_len + 1]`` rows (``neg``: one sampled negative per position).

        - ``bce``: -log s(h.e_pos) - log s(-h.e_neg), one negative per position (SASRec).
        - ``softmax``: cross-entropy over all items.
        - ``sampled_softmax``: cross-entropy over the target and ``num_negatives`` uniform items shared by
          the batch (a negative equal to the target is masked out).
        """
        if loss not in LOSSES:
            raise ValueError(f"loss {loss!r} is not supported; choose one of {LOSSES}")
        inp, tgt, neg = self.training_inputs(seq, neg, generator)
        h = self.hidden(inp)
        valid = tgt != 0
        h, tgt, neg = h[valid], tgt[valid], neg[valid]
        if loss == "bce":
            pos_logit = (h * self.item_emb(tgt)).sum(-1)
            neg_logit = (h * self.item_emb(neg)).sum(-1)
            return (F.binary_cross_entropy_with_logits(pos_logit, torch.ones_like(pos_logit))
                    + F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit)))
        if loss == "softmax":
            return F.cross_entropy(self.item_logits(h), tgt)
        samples = torch.randint(1, self.num_items + 1, (num_negatives,), device=h.device, generator=generator)
        pos_logit = (h * self.item_emb(tgt)).sum(-1, keepdim=True)
        neg_logit = h @ self.item_emb(samples).T
        neg_logit = neg_logit.masked_fill(samples[None, :] == tgt[:, None], float("-inf"))
        logits = torch.cat([pos_logit, neg_logit], dim=1)
        return F.cross_entropy(logits, torch.zeros_like(tgt))

    # -- save / reload
    def save_pretrained(self, path) -> Path:
        """Write the backbone (``save_pretrained``), ``item_embeddings.safetensors`` and ``recsys.json``.

        >>> import tempfile
        >>> m = SeqRecModel(num_items=5, hidden_size=8, num_layers=1, max_len=4)
        >>> m2 = SeqRecModel.from_pretrained(m.save_pretrained(tempfile.mkdtemp()))
        >>> torch.equal(m.item_emb.weight, m2.item_emb.weight)
        True
        """
        import json

        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(str(path))
        save_file({"item_emb": self.item_emb.weight.detach().contiguous().cpu()}, str(path / "item_embeddings.safetensors"))
        meta = {"num_items": self.num_items, "max_len": self.max_len, "mask_prob": self.mask_prob, "causal": self.causal}
        (path / "recsys.json").write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, path) -> SeqRecModel:
        """Reload a model written by :meth:`save_pretrained` (backbone from ``path``, then the item embeddings)."""
        import json

        from safetensors.torch import load_file

        path = Path(path)
        meta_file = path / "recsys.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file} not found: {str(path)!r} was not written by SeqRecModel.save_pretrained")
        meta = json.loads(meta_file.read_text())
        model = cls(meta["num_items"], checkpoint=str(path), max_len=meta["max_len"], mask_prob=meta["mask_prob"])
        model.item_emb.load_state_dict({"weight": load_file(str(path / "item_embeddings.safetensors"))["item_emb"]})
        return model.eval()
