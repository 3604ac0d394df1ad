"""Loss recovered: CE / KL scores on a random tiny GPT-2, embedding score on MiniLM."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from splinterp import SAE, SAEConfig  # noqa: E402
from splinterp.data.cache import Standardizer  # noqa: E402
from splinterp.errors import ConfigError, ShapeError  # noqa: E402
from splinterp.evals import (  # noqa: E402
    ce_loss_score,
    embedding_loss_score,
    kl_div_score,
    sentence_embedding,
    splice,
)

V, D = 50, 16


@pytest.fixture(scope="module")
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=D, n_head=2, n_positions=32, vocab_size=V, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(1))


def identity_sae(d: int) -> SAE:
    """ReLU SAE with W_enc = [I, -I], W_dec = [I; -I]: relu(x) - relu(-x) = x exactly."""
    sae = SAE(SAEConfig(d, 2 * d, "relu"))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae


def zero_sae(d: int) -> SAE:
    sae = SAE(SAEConfig(d, 4, "relu"))
    with torch.no_grad():
        sae.W_dec.zero_()
    return sae


def test_clean_ce_matches_hf_loss(gpt2, ids):
    res = ce_loss_score(gpt2, ids, identity_sae(D), layer=0)
    with torch.no_grad():
        hf = float(gpt2(ids, labels=ids).loss)  # HF's own shifted next-token CE
    assert res["ce_loss_without_sae"] == pytest.approx(hf, rel=1e-5)
    assert res["n_tokens"] == 3 * 11
    # a lossless SAE recovers everything; zero-ablation is its own worst case
    assert res["ce_loss_with_sae"] == pytest.approx(res["ce_loss_without_sae"], abs=1e-5)
    assert res["ce_loss_score"] == pytest.approx(1.0, abs=1e-3)
    assert res["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-6) and res["kl_div_score"] == pytest.approx(1.0)
    assert res["ce_loss_with_ablation"] != pytest.approx(res["ce_loss_without_sae"], abs=1e-4)


def test_zero_sae_scores_zero_and_formula(gpt2, ids):
    res = ce_loss_score(gpt2, ids, zero_sae(D), layer=1)
    assert res["ce_loss_with_sae"] == pytest.approx(res["ce_loss_with_ablation"], abs=1e-6)
    assert res["ce_loss_score"] == pytest.approx(0.0, abs=1e-4)
    assert res["kl_div_score"] == pytest.approx(0.0, abs=1e-4)
    # a lossy SAE: the score is exactly the SAELens formula of the three losses
    sae = SAE(SAEConfig(D, 8, "topk", k=2, seed=3))
    r = ce_loss_score(gpt2, ids, sae, layer=0)
    abl, with_sae, clean = r["ce_loss_with_ablation"], r["ce_loss_with_sae"], r["ce_loss_without_sae"]
    assert r["ce_loss_score"] == pytest.approx((abl - with_sae) / (abl - clean))
    kl_abl, kl_sae = r["kl_div_with_ablation"], r["kl_div_with_sae"]
    assert r["kl_div_score"] == pytest.approx((kl_abl - kl_sae) / kl_abl)
    assert r["kl_div_with_sae"] > 0


def test_ce_by_hand_with_manual_hook(gpt2, ids):
    """ce_loss_with_sae equals CE of the model whose block output is replaced by sae(h), done by hand."""
    sae = SAE(SAEConfig(D, 8, "topk", k=3, seed=5))
    r = ce_loss_score(gpt2, ids, sae, layer=1, include_kl=False)
    assert "kl_div_score" not in r
    handle = gpt2.transformer.h[1].register_forward_hook(lambda m, a, o: sae(o).detach())
    try:
        with torch.no_grad():
            logits = gpt2(ids).logits
    finally:
        handle.remove()
    by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    assert r["ce_loss_with_sae"] == pytest.approx(float(by_hand), rel=1e-5)


def test_padding_is_ignored(gpt2, ids):
    """Right- and left-padded batches give the token-weighted CE of the unpadded sequences."""
    sae = SAE(SAEConfig(D, 8, "topk", k=2, seed=3))
    seqs = [ids[0, :12], ids[1, :7], ids[2, :4]]
    sep = [ce_loss_score(gpt2, s[None], sae, layer=0) for s in seqs]
    n = sum(r["n_tokens"] for r in sep)
    for side in ("right", "left"):
        batch = torch.zeros(3, 12, dtype=torch.long)
        mask = torch.zeros(3, 12, dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(0, len(s)) if side == "right" else slice(12 - len(s), 12)
            batch[i, sl], mask[i, sl] = s, 1
        r = ce_loss_score(gpt2, {"input_ids": batch, "attention_mask": mask}, sae, layer=0)
        assert r["n_tokens"] == n == 11 + 6 + 3
        for key in ("ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation", "kl_div_with_sae"):
            want = sum(x[key] * x["n_tokens"] for x in sep) / n
            assert r[key] == pytest.approx(want, rel=1e-4, abs=1e-6), (side, key)


def test_batches_iterable_and_kl_variant(gpt2, ids):
    sae = SAE(SAEConfig(D, 8, "relu", seed=2))
    one = ce_loss_score(gpt2, ids, sae, layer=0)
    many = ce_loss_score(gpt2, [ids[:1], ids[1:]], sae, layer=0)
    assert many["ce_loss_with_sae"] == pytest.approx(one["ce_loss_with_sae"], rel=1e-5)
    kl = kl_div_score(gpt2, ids, sae, layer=0)
    assert set(kl) == {"kl_div_with_sae", "kl_div_with_ablation", "kl_div_score", "n_tokens"}
    assert kl["kl_div_score"] == pytest.approx(one["kl_div_score"])


def test_standardizer_in_the_splice(gpt2, ids):
    """An identity SAE in standardised units is still lossless once the standardizer is undone."""
    s = Standardizer(mean=torch.randn(D, dtype=torch.float64), std=torch.rand(D, dtype=torch.float64) + 0.5)
    r = ce_loss_score(gpt2, ids, identity_sae(D), layer=0, standardizer=s)
    assert r["ce_loss_score"] == pytest.approx(1.0, abs=1e-3)


def test_hook_removed_and_errors(gpt2, ids):
    with torch.no_grad():
        before = gpt2(ids).logits
    ce_loss_score(gpt2, ids, zero_sae(D), layer=0)
    with torch.no_grad():
        assert torch.equal(gpt2(ids).logits, before)  # no hook left behind
    with pytest.raises(ShapeError, match="d_in"):
        ce_loss_score(gpt2, ids, SAE(SAEConfig(D + 1, 4, "relu")), layer=0)
    with torch.no_grad():
        assert torch.equal(gpt2(ids).logits, before)  # not even after an error inside the hook
    with pytest.raises(ConfigError, match="layer"):
        ce_loss_score(gpt2, ids, zero_sae(D), layer=2)
    with pytest.raises(ConfigError, match="embedding_loss_score"):
        ce_loss_score(None, ids, zero_sae(D), layer=0)
    with pytest.raises(ConfigError, match="no logits"):
        ce_loss_score(gpt2.transformer, ids, zero_sae(D), layer=0)


def test_splice_replaces_tuple_outputs():
    class Block(torch.nn.Module):
        def forward(self, x):
            return (x + 1, "extra")

    b = Block()
    with splice(b, lambda h: h * 0):
        out = b(torch.ones(2))
    assert torch.equal(out[0], torch.zeros(2)) and out[1] == "extra"
    assert torch.equal(b(torch.ones(2))[0], torch.full((2,), 2.0))


def test_sentence_embedding_mean_pools_real_tokens():
    h = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(sentence_embedding(h, mask, normalize=False), torch.tensor([[2.0, 2.0]]))
    torch.testing.assert_close(sentence_embedding(h, mask), torch.tensor([[0.5**0.5, 0.5**0.5]]))


def test_embedding_score_on_minilm():
    from splinterp.data.harvest import load_model

    model, tok, _ = load_model(None)
    texts = ["Sparse autoencoders are splines.", "The assert statement.", "Power diagrams and k-means."]
    ident = embedding_loss_score((model, tok), None, identity_sae(384), layer=3, texts=texts)
    assert ident["emb_loss_with_sae"] == pytest.approx(0.0, abs=1e-8)
    assert ident["emb_loss_score"] == pytest.approx(1.0, abs=1e-5) and ident["n_texts"] == 3
    zero = embedding_loss_score(model, tok, zero_sae(384), layer=3, texts=texts, metric="cos")
    assert zero["emb_loss_with_sae"] == pytest.approx(zero["emb_loss_with_ablation"], rel=1e-5)
    assert zero["emb_loss_score"] == pytest.approx(0.0, abs=1e-5) and 0 < zero["emb_loss_with_ablation"] <= 2
    noisy = SAE(SAEConfig(384, 768, "topk", k=16, seed=0))
    r = embedding_loss_score(model, tok, noisy, layer=3, texts=texts)
    assert r["emb_loss_with_sae"] > 0 and math.isfinite(r["emb_loss_score"])
    with pytest.raises(ConfigError):
        embedding_loss_score(model, tok, noisy, layer=3, texts=texts, metric="l1")
