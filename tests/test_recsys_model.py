"""The recommendation model: tied scores, causal vs bidirectional, losses vs fp64 references, save/reload."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recipes.recsys.model import SeqRecModel

N = 30


def _model(backbone="gpt2", **kw):
    torch.manual_seed(0)
    return SeqRecModel(N, backbone=backbone, hidden_size=16, num_layers=2, num_heads=2, dropout=0.0, max_len=6,
                       **kw).eval()


def _batch():
    seq = torch.tensor([[0, 0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 0, 0, 9, 11]])
    neg = torch.tensor([[0, 0, 0, 20, 21, 22, 23], [8, 9, 10, 11, 12, 13, 14], [0, 0, 0, 0, 0, 25, 26]])
    return seq, neg


@pytest.mark.parametrize("backbone", ["gpt2", "bert"])
def test_scores_are_tied_to_item_embeddings(backbone):
    m = _model(backbone)
    seq = _batch()[0][:, 1:]
    s = m.scores(seq)
    assert s.shape == (3, N + 1)
    assert torch.isneginf(s[:, 0]).all()  # the padding item is never recommended
    ref = m.last_hidden(seq).double() @ m.item_emb.weight[: N + 1].double().T
    assert torch.allclose(s[:, 1:].double(), ref[:, 1:], atol=1e-5)
    assert torch.count_nonzero(m.item_emb.weight[0]) == 0


def test_gpt2_is_causal_and_bert_is_not():
    seq = torch.tensor([[0, 1, 2, 3, 4, 5]])
    changed = seq.clone()
    changed[0, -1] = 9
    for backbone, causal in (("gpt2", True), ("bert", False)):
        m = _model(backbone)
        h, h2 = m.hidden(seq), m.hidden(changed)
        assert torch.allclose(h[:, :-1], h2[:, :-1], atol=1e-6) == causal, backbone


def _reference_loss(m, seq, neg, loss, samples=None):
    inp, tgt, negs = m.training_inputs(seq, neg)
    h = m.hidden(inp).double()
    valid = tgt != 0
    h, tgt, negs = h[valid], tgt[valid], negs[valid]
    E = m.item_emb.weight.double()
    if loss == "bce":
        pos, ng = (h * E[tgt]).sum(-1), (h * E[negs]).sum(-1)
        return (-torch.log(torch.sigmoid(pos)).mean() - torch.log(1 - torch.sigmoid(ng)).mean())
    if loss == "softmax":
        logits = h @ E[1: N + 1].T
        return F.cross_entropy(logits, tgt - 1)
    logits = torch.cat([(h * E[tgt]).sum(-1, keepdim=True), h @ E[samples].T], 1)
    logits[:, 1:][samples[None, :] == tgt[:, None]] = float("-inf")
    return F.cross_entropy(logits, torch.zeros_like(tgt))


@pytest.mark.parametrize("loss", ["bce", "softmax", "sampled_softmax"])
def test_losses_match_fp64_reference_gpt2(loss):
    m = _model("gpt2")
    seq, neg = _batch()
    samples = None
    if loss == "sampled_softmax":
        samples = torch.randint(1, N + 1, (12,), generator=torch.Generator().manual_seed(5))
        samples[0] = 4  # a collision with a target: must be masked, not counted as a negative
    got = m.loss(seq, neg, loss, num_negatives=12, generator=torch.Generator().manual_seed(5)) if samples is None \
        else _loss_with_samples(m, seq, neg, samples)
    ref = _reference_loss(m, seq, neg, loss, samples)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def _loss_with_samples(m, seq, neg, samples):
    orig = torch.randint

    def fake(low, high, size, **kw):
        assert (low, high) == (1, N + 1)
        return samples.clone()

    torch.randint = fake
    try:
        return m.loss(seq, neg, "sampled_softmax", num_negatives=len(samples))
    finally:
        torch.randint = orig


def test_causal_targets_follow_sasrec_alignment():
    m = _model("gpt2")
    seq, neg = _batch()
    inp, tgt, _negs = m.training_inputs(seq, neg)
    assert inp[0].tolist() == [0, 0, 0, 3, 4, 5] and tgt[0].tolist() == [0, 0, 0, 4, 5, 6]
    assert tgt[2].tolist() == [0, 0, 0, 0, 0, 11]  # no target where the input is padding


def test_bert_masking_hits_real_items_only_and_every_row():
    m = _model("bert", mask_prob=0.3)
    seq, neg = _batch()
    for s in range(20):
        inp, tgt, _ = m.training_inputs(seq, neg, torch.Generator().manual_seed(s))
        masked = inp == m.mask_item
        assert torch.equal(masked, tgt != 0)
        assert (seq[:, 1:][masked] != 0).all()  # padding is never masked
        assert masked.any(1).all()  # every row trains on something
        assert torch.equal(torch.where(masked, tgt, inp), seq[:, 1:])


@pytest.mark.parametrize("backbone", ["gpt2", "bert"])
@pytest.mark.parametrize("loss", ["bce", "softmax", "sampled_softmax"])
def test_few_steps_reduce_the_loss(backbone, loss):
    from recipes.recsys.data import TrainDataset
    from recipes.recsys.synthetic import synthetic_interactions

    d = synthetic_interactions(num_users=64, num_items=N, min_len=6, max_len=8, seed=0)
    ds = TrainDataset([s[:-2] for s in d.sequences], N, max_len=6, seed=0)
    batch = {k: torch.stack([ds[i][k] for i in range(64)]) for k in ("seq", "neg")}
    m = _model(backbone, mask_prob=0.3).train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(6):
        loss_value = m.loss(batch["seq"], batch["neg"], loss, num_negatives=10, generator=g)
        opt.zero_grad()
        loss_value.backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss_value.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-2:]) < losses[0]


@pytest.mark.parametrize("backbone", ["gpt2", "bert"])
def test_save_pretrained_round_trip(tmp_path, backbone):
    m = _model(backbone)
    seq = _batch()[0][:, 1:]
    path = m.save_pretrained(tmp_path / "m")
    m2 = SeqRecModel.from_pretrained(path)
    assert m2.causal == m.causal
    assert torch.allclose(m.scores(seq), m2.scores(seq), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="recsys.json"):
        SeqRecModel.from_pretrained(tmp_path)


def test_backbone_from_a_config_directory_and_unsupported_types(tmp_path):
    from transformers import RobertaConfig, ViTConfig

    RobertaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                  max_position_embeddings=16, vocab_size=10).save_pretrained(tmp_path / "roberta")
    m = SeqRecModel(N, checkpoint=str(tmp_path / "roberta"), max_len=6)
    assert not m.causal and m.scores(_batch()[0][:, 1:]).shape == (3, N + 1)
    ViTConfig(hidden_size=16).save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="model type 'vit'.*not supported.*causal types"):
        SeqRecModel(N, checkpoint=str(tmp_path / "vit"))
    with pytest.raises(ValueError, match="max_len=40 exceeds the backbone's 16 positions"):
        SeqRecModel(N, checkpoint=str(tmp_path / "roberta"), max_len=40)
    with pytest.raises(ValueError, match="backbone 'lstm' is not supported; choose one of"):
        SeqRecModel(N, backbone="lstm")
    with pytest.raises(ValueError, match="loss 'hinge' is not supported"):
        _model().loss(*_batch(), loss="hinge")


def test_xavier_init_as_sasrec_pytorch(tmp_path):
    """init='xavier': every backbone weight with >= 2 dims is Xavier-normal, 1-d ones keep the backbone's init."""
    torch.manual_seed(0)
    ref = SeqRecModel(N, hidden_size=50, num_layers=2, max_len=50)
    torch.manual_seed(0)
    m = SeqRecModel(N, hidden_size=50, num_layers=2, max_len=50, init="xavier")
    for (name, p), (_, q) in zip(m.backbone.named_parameters(), ref.backbone.named_parameters()):
        if p.dim() >= 2 and p.numel() < 1000:  # the unused 1-token wte: too few values for a std check
            assert not torch.equal(p, q), name
        elif p.dim() >= 2:
            fan_in, fan_out = p.shape[1], p.shape[0]
            expected = (2.0 / (fan_in + fan_out)) ** 0.5
            assert float(p.std()) == pytest.approx(expected, rel=0.1), name  # GPT-2's own init is 0.02
        else:
            assert torch.equal(p, q), name  # LayerNorm gains and biases untouched
    assert float(ref.backbone.h[0].attn.c_attn.weight.std()) == pytest.approx(0.02, rel=0.1)
    ref.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="init='xavier' would overwrite the weights of checkpoint"):
        SeqRecModel(N, checkpoint=str(tmp_path / "m"), max_len=50, init="xavier")
    with pytest.raises(ValueError, match=r"init 'orthogonal' is not supported; choose one of \('backbone', 'xavier'\)"):
        SeqRecModel(N, init="orthogonal")
