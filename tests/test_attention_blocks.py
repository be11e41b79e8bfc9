"""``collect.attention.attention_blocks``: the query / key projections of Hugging Face attention blocks, by name,
with their head_dim, across model families built from tiny configs."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from tick_lightning.collect.attention import attention_blocks, output_head


def _family(name):
    import transformers as t

    common = dict(vocab_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if name == "bert":
        return t.BertModel(t.BertConfig(hidden_size=32, **common)), "encoder.layer.{}.attention.self", 16, False
    if name == "gpt2":
        return (t.GPT2Model(t.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2)), "h.{}.attn", 16, True)
    if name == "llama":
        return (t.LlamaModel(t.LlamaConfig(hidden_size=32, num_key_value_heads=1, head_dim=8, **common)),
                "layers.{}.self_attn", 8, False)  # head_dim its own (8), not hidden / heads (16); GQA keys
    if name == "vit":
        cfg = t.ViTConfig(hidden_size=32, image_size=8, patch_size=4, **{k: v for k, v in common.items()
                                                                         if k != "vocab_size"})
        return t.ViTModel(cfg), "layers.{}.attention", 16, False  # transformers 5's ViT layout
    if name == "distilbert":
        cfg = t.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
        return t.DistilBertModel(cfg), "transformer.layer.{}.attention", 16, False
    if name == "t5":
        cfg = t.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2)
        return t.T5EncoderModel(cfg), "encoder.block.{}.layer.0.SelfAttention", 8, False


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "vit", "distilbert", "t5"])
def test_every_attention_block_is_found_with_its_head_dim(family):
    model, pattern, head_dim, fused = _family(family)
    blocks = attention_blocks(model)
    layers = 1 if family == "t5" else 2
    assert [b.name for b in blocks] == [pattern.format(i) for i in range(layers)]
    assert all(b.head_dim == head_dim and b.fused == fused for b in blocks), blocks
    assert all((b.query is b.key) == fused for b in blocks)


def test_a_model_without_attention_has_none_and_a_block_without_a_head_count_is_left_out():
    assert attention_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU())) == []

    class NoHeads(nn.Module):  # query / key children, but nothing says the head size: the scale would be a guess
        def __init__(self):
            super().__init__()
            self.query, self.key = nn.Linear(4, 4), nn.Linear(4, 4)

    assert attention_blocks(nn.Sequential(NoHeads())) == []
    block = NoHeads()
    block.num_heads, block.embed_dim = 2, 4
    assert [(b.name, b.head_dim) for b in attention_blocks(nn.Sequential(block))] == [("0", 2)]


def test_the_flight_recorder_warns_when_asked_for_attention_logits_of_a_model_without_them(tmp_path):
    import lightning as L
    import tiny

    from tick_lightning import TickCallback

    class MLP(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 2)

        def training_step(self, batch, _):
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cb = TickCallback(ticks="every:5", states=["loss"], dirpath=tmp_path / "ticks", log_to_loggers=False,
                      flight=["attn_logit"])
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4)), batch_size=4)
    with pytest.warns(UserWarning, match=r"flight=\['attn_logit'\] found no attention block"):
        tiny.trainer(tmp_path, callbacks=[cb], max_steps=3).fit(MLP(), data)

    cb = TickCallback(ticks="every:5", states=["loss"], dirpath=tmp_path / "ticks2", log_to_loggers=False)
    with warnings.catch_warnings():  # the defaults take what the model has: no warning
        warnings.filterwarnings("error", message=".*attention block.*")
        tiny.trainer(tmp_path, callbacks=[cb], max_steps=3).fit(MLP(), data)


def _head(name):
    import transformers as t

    bert = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    gpt2 = t.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2)
    llama = t.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=64, tie_word_embeddings=True)
    vit = t.ViTConfig(hidden_size=32, image_size=8, patch_size=4, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64)
    return {"bert-cls": lambda: t.BertForSequenceClassification(t.BertConfig(**bert)),
            "bert-mlm": lambda: t.BertForMaskedLM(t.BertConfig(**bert)),
            "bert-base": lambda: t.BertModel(t.BertConfig(**bert)),
            "gpt2-lm": lambda: t.GPT2LMHeadModel(gpt2),
            "gpt2-cls": lambda: t.GPT2ForSequenceClassification(gpt2),
            "llama-lm-tied": lambda: t.LlamaForCausalLM(llama),
            "vit-cls": lambda: t.ViTForImageClassification(vit)}[name]()


@pytest.mark.parametrize("family, name", [
    ("bert-cls", "classifier"), ("bert-mlm", "cls.predictions.decoder"), ("bert-base", None), ("gpt2-lm", "lm_head"),
    ("gpt2-cls", "score"), ("llama-lm-tied", "lm_head"), ("vit-cls", "classifier")])
def test_the_output_head_is_found_by_the_models_own_accessor_or_its_name(family, name):
    """``get_output_embeddings()`` (language-model heads, tied or not), else a ``classifier`` / ``score`` child; a
    bare encoder has none. Its block is the head's own module (its output: the logits)."""
    model = _head(family)
    head = output_head(model)
    assert (head.name if head else None) == name
    if head is not None:
        assert head.output and head.query is dict(model.named_modules())[name] and head.scale == 1.0
