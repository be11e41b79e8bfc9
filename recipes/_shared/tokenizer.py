"""A small tokenizer trained on the fly (``tokenizers``), for the offline defaults and models from scratch."""

from __future__ import annotations

from typing import Iterable

from recipes._shared.errors import RecipeError


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 2000, kind: str = "wordlevel",
                    add_cls_sep: bool = True, lowercase: bool = True):
    """Train a small tokenizer on the fly (``tokenizers``) and wrap it as a ``PreTrainedTokenizerFast``.

    ``kind``: ``"wordlevel"`` (whitespace words), ``"bpe"`` (byte-level BPE) or ``"char"`` (characters).

    Example:
        >>> tok = train_tokenizer(["a good film", "a bad film"], vocab_size=20)
        >>> tok("a good film")["input_ids"][0] == tok.cls_token_id
        True
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    kinds = ("wordlevel", "bpe", "char")
    if kind not in kinds:
        raise RecipeError(f"tokenizer kind {kind!r} is not supported; choose one of {list(kinds)}.")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        tok.pre_tokenizer = (pre_tokenizers.Whitespace() if kind == "wordlevel"
                             else pre_tokenizers.Split("", behavior="isolated"))
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials)
        if kind == "char":
            tok.decoder = decoders.Fuse()
    if lowercase and kind == "wordlevel":
        tok.normalizer = normalizers.Lowercase()
    tok.train_from_iterator(texts, trainer=trainer)
    if add_cls_sep:
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
