"""Harvesting: site convention, TransformerLens hook names (checked against TransformerLens itself and the
residual stream's decomposition), padding (left and right), token selection, shards, atomicity, bad arguments."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import splinterp as sp  # noqa: E402
from splinterp.data.cache import ActivationCache  # noqa: E402
from splinterp.data.harvest import (  # noqa: E402
    _ShardWriter,
    cache_key,
    find_blocks,
    harvest,
    load_model,
    normalise_layers,
    sae_metadata,
    select_tokens,
    write_cache,
)
from splinterp.data.text import offline_texts  # noqa: E402
from splinterp.errors import ConfigError, DeviceError, EmptyDataError, OverwriteError  # noqa: E402

TEXTS = [
    "The assert statement is a convenient way to insert debugging assertions.",
    "Hello world.",
    "Sparse autoencoders cut activation space into regions; each region is affine.",
    "A",
    "Power diagrams generalise Voronoi diagrams with one weight per site and a squared distance.",
]


@pytest.fixture(scope="module")
def minilm():
    model, tok, _ = load_model(None)
    return model, tok


@pytest.fixture(scope="module")
def tiny_gpt2(minilm):
    """A random 2-block GPT-2 that reads the MiniLM tokenizer's ids (no download)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = copy.deepcopy(minilm[1])
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128, vocab_size=len(tok),
                     bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    return GPT2LMHeadModel(cfg).eval(), tok


_SINGLE: dict = {}


def _single(model, tok, text, max_length=128):
    """Hidden states of one unpadded text (the reference for every padding test), memoised."""
    key = (id(model), text, max_length)
    if key not in _SINGLE:
        _SINGLE[key] = _single_uncached(model, tok, text, max_length)
    return _SINGLE[key]


def _single_uncached(model, tok, text, max_length):
    enc = tok([text], return_tensors="pt", truncation=True, max_length=max_length)
    with torch.no_grad():  # no token_type_ids: GPT-2 would add their embedding (harvest passes none)
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
    return enc["input_ids"][0], out.hidden_states


def test_resid_post_matches_hidden_states_and_drops_padding(minilm, tmp_path):
    model, tok = minilm
    cache = harvest((model, tok), TEXTS, layers="all", out=tmp_path / "c", shard_tokens=7, batch_size=3,
                    progress=False)
    assert cache.layers == list(range(6)) and cache.d_model == 384
    lengths = [len(tok(t)["input_ids"]) for t in TEXTS]
    assert cache.n_tokens == sum(lengths)  # every real token, no padding
    assert len(cache.shards) == -(-sum(lengths) // 7) and all(s["n_tokens"] == 7 for s in cache.shards[:-1])
    text_ids = cache.text_ids()
    for layer in (0, 3, 5):
        acts = cache.load(layer)
        for i, text in enumerate(TEXTS):
            ids, hs = _single(model, tok, text)
            # resid_post of block l = hidden_states[l + 1]; padding in the batch changes nothing
            torch.testing.assert_close(acts[text_ids == i], hs[layer + 1][0], atol=2e-5, rtol=1e-4)
    ids0, _ = _single(model, tok, TEXTS[0])
    assert torch.equal(cache.token_ids()[text_ids == 0], ids0)
    assert torch.equal(cache.positions()[text_ids == 0], torch.arange(len(ids0)))
    assert cache.token_strings(index=[0])[0] == "[CLS]"
    assert cache.texts == TEXTS
    m = cache.manifest
    assert m["model_class"] == "BertModel" and m["block_list"] == "encoder.layer" and m["site"] == "resid_post"
    assert m["token_selection"] == "all" and m["max_length"] == 128 and m["splinterp_version"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_last_token_is_right_under_both_paddings(minilm, tmp_path, side):
    model, tok = minilm
    tok = copy.deepcopy(tok)
    tok.padding_side = side
    cache = harvest((model, tok), TEXTS, layers=[1, 4], out=tmp_path / side, token_selection="last",
                    batch_size=5, progress=False)
    assert cache.n_tokens == len(TEXTS) and cache.manifest["harvest"]["padding_side"] == side
    assert (cache.token_ids() == tok.sep_token_id).all()  # BERT's last real token is [SEP]
    assert sorted(cache.text_ids().tolist()) == list(range(len(TEXTS)))
    for layer in (1, 4):
        acts = cache.load(layer)
        for i, text in enumerate(TEXTS):
            _, hs = _single(model, tok, text)
            row = acts[cache.text_ids() == i]
            assert row.shape == (1, 384)
            torch.testing.assert_close(row[0], hs[layer + 1][0, -1], atol=2e-5, rtol=1e-4)


def test_last_token_skipping_special_tokens(minilm, tmp_path):
    model, tok = minilm
    tok = copy.deepcopy(tok)
    tok.padding_side = "left"
    cache = harvest((model, tok), TEXTS, layers=2, out=tmp_path / "c", token_selection="last",
                    drop_special_tokens=True, progress=False)
    for i, text in enumerate(TEXTS):
        ids, hs = _single(model, tok, text)
        row = cache.text_ids() == i
        assert int(cache.token_ids()[row]) == int(ids[-2])  # the token before [SEP]
        torch.testing.assert_close(cache.load(2)[row][0], hs[3][0, -2], atol=2e-5, rtol=1e-4)


def test_drop_special_tokens_all(minilm, tmp_path):
    model, tok = minilm
    cache = harvest((model, tok), TEXTS, layers=0, out=tmp_path / "c", drop_special_tokens=True, progress=False)
    ids = cache.token_ids()
    assert not bool(torch.isin(ids, torch.tensor([tok.cls_token_id, tok.sep_token_id, tok.pad_token_id])).any())
    assert cache.n_tokens == sum(len(tok(t)["input_ids"]) - 2 for t in TEXTS)


def test_sort_by_length_changes_only_the_order(minilm, tmp_path):
    model, tok = minilm
    a = harvest((model, tok), TEXTS, layers=1, out=tmp_path / "a", batch_size=2, progress=False)
    b = harvest((model, tok), TEXTS, layers=1, out=tmp_path / "b", batch_size=2, sort_by_length=False,
                progress=False)
    assert torch.equal(b.text_ids(), torch.sort(b.text_ids(), stable=True).values)  # text order
    assert not torch.equal(a.text_ids(), b.text_ids())
    lengths = torch.bincount(a.text_ids())
    assert (lengths[a.text_ids().unique_consecutive()].diff() >= 0).all()  # short texts first
    key = lambda c: c.text_ids() * 1000 + c.positions()  # noqa: E731
    pa, pb = torch.argsort(key(a)), torch.argsort(key(b))
    torch.testing.assert_close(a.load(1)[pa], b.load(1)[pb], atol=2e-5, rtol=1e-4)
    assert torch.equal(a.token_ids()[pa], b.token_ids()[pb])


def test_max_length_truncates(minilm, tmp_path):
    model, tok = minilm
    cache = harvest((model, tok), TEXTS, layers=0, out=tmp_path / "c", max_length=6, progress=False)
    assert cache.n_tokens == sum(min(len(tok(t)["input_ids"]), 6) for t in TEXTS)
    assert int(cache.positions().max()) == 5


def test_gpt2_left_padding_all_tokens_and_sites(tiny_gpt2, tmp_path):
    """A causal model with absolute positions: left padding must not shift real tokens' positions."""
    model, tok = tiny_gpt2
    tok.padding_side = "left"
    assert find_blocks(model)[0] == "transformer.h"
    post = harvest((model, tok), TEXTS, layers=[0, 1], out=tmp_path / "post", batch_size=5, progress=False)
    pre = harvest((model, tok), TEXTS, layers=[1], out=tmp_path / "pre", site="resid_pre", batch_size=5,
                  progress=False)
    tids = post.text_ids()
    for i, text in enumerate(TEXTS):
        _, hs = _single(model, tok, text)
        torch.testing.assert_close(post.load(0)[tids == i], hs[1][0], atol=1e-5, rtol=1e-4)
        # the last block's raw output is kept: HF's hidden_states[-1] has ln_f applied on top
        raw_last = post.load(1)[tids == i]
        torch.testing.assert_close(model.transformer.ln_f(raw_last), hs[2][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pre.load(1), post.load(0))  # resid_pre of block 1 = resid_post of block 0


def test_float16_storage(minilm, tmp_path):
    model, tok = minilm
    c16 = harvest((model, tok), TEXTS[:2], layers=5, out=tmp_path / "h", dtype="float16", progress=False)
    c32 = harvest((model, tok), TEXTS[:2], layers=5, out=tmp_path / "f", progress=False)
    assert c16.dtype == torch.float16 and c16.load(5, dtype=None).dtype == torch.float16
    torch.testing.assert_close(c16.load(5), c32.load(5), atol=1e-2, rtol=1e-3)
    size = {k: os.path.getsize(tmp_path / k / c.shards[0]["file"]) for k, c in (("h", c16), ("f", c32))}
    assert size["h"] < 0.6 * size["f"]


def test_refuses_to_overwrite_and_replaces_when_asked(minilm, tmp_path):
    model, tok = minilm
    out = tmp_path / "c"
    harvest((model, tok), TEXTS[:2], layers=0, out=out, progress=False)
    with pytest.raises(OverwriteError, match="overwrite"):
        harvest((model, tok), TEXTS[:1], layers=0, out=out, progress=False)
    c = harvest((model, tok), TEXTS[:1], layers=0, out=out, overwrite=True, progress=False)
    assert c.manifest["n_texts"] == 1 and ActivationCache.open(out).n_tokens == c.n_tokens


def test_crash_mid_harvest_leaves_nothing(minilm, tmp_path, monkeypatch):
    model, tok = minilm
    calls = {"n": 0}
    real_flush = _ShardWriter._flush

    def flaky(self, n):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full")
        real_flush(self, n)

    monkeypatch.setattr(_ShardWriter, "_flush", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        harvest((model, tok), TEXTS, layers=0, out=tmp_path / "c", shard_tokens=5, progress=False)
    assert calls["n"] == 2
    assert not (tmp_path / "c").exists() and list(tmp_path.iterdir()) == []


def test_bad_arguments(minilm, tmp_path):
    model, tok = minilm
    with pytest.raises(ConfigError, match="out of range"):
        harvest((model, tok), TEXTS, layers=[6], out=tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="token_selection"):
        harvest((model, tok), TEXTS, layers=0, out=tmp_path / "b", token_selection="first", progress=False)
    with pytest.raises(ConfigError, match="site"):
        harvest((model, tok), TEXTS, layers=0, out=tmp_path / "c", site="mlp_in", progress=False)
    with pytest.raises(ConfigError, match="list of strings"):
        harvest((model, tok), "one string", layers=0, out=tmp_path / "d", progress=False)
    with pytest.raises(EmptyDataError):
        harvest((model, tok), [], layers=0, out=tmp_path / "e", progress=False)
    assert not any(tmp_path.iterdir())


def test_normalise_layers():
    assert normalise_layers("all", 3) == [0, 1, 2]
    assert normalise_layers([-1, 0, 0], 4) == [0, 3]
    assert normalise_layers(2, 4) == [2]
    for bad in ([4], [True], "first", []):
        with pytest.raises(ConfigError):
            normalise_layers(bad, 4)


def test_select_tokens_last_any_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    last = select_tokens(mask, "last")
    assert last.nonzero().tolist() == [[0, 2], [1, 4], [2, 4]]  # the empty row selects nothing
    special = torch.zeros_like(mask, dtype=torch.bool)
    special[:, 4] = True
    assert select_tokens(mask, "last", special).nonzero().tolist() == [[0, 2], [1, 3], [2, 3]]
    assert torch.equal(select_tokens(mask, "all"), mask.bool())


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)


def _stack(n):
    return nn.ModuleList(_Block() for _ in range(n))


class _Cfg:
    num_hidden_layers = 3


class _Llama(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = _Cfg()
        self.model = nn.Module()
        self.model.layers = _stack(3)
        self.vision = nn.Module()
        self.vision.encoder = nn.Module()
        self.vision.encoder.layers = _stack(3)  # deeper: not the main stack


class _NeoX(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = _Cfg()
        self.gpt_neox = nn.Module()
        self.gpt_neox.layers = _stack(3)
        self.heads = _stack(2)  # wrong length


class _EncDec(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = _Cfg()
        self.encoder = nn.Module()
        self.encoder.block = _stack(3)
        self.decoder = nn.Module()
        self.decoder.block = _stack(3)


def test_find_blocks_generic():
    assert find_blocks(_Llama())[0] == "model.layers"
    assert find_blocks(_NeoX())[0] == "gpt_neox.layers"
    with pytest.raises(ConfigError, match="ambiguous"):
        find_blocks(_EncDec())
    name, blocks = find_blocks(_EncDec(), blocks="decoder.block")
    assert name == "decoder.block" and len(blocks) == 3
    with pytest.raises(ConfigError, match="could not find"):
        find_blocks(_Block())
    with pytest.raises(ConfigError, match="no submodule"):
        find_blocks(_Llama(), blocks="model.nope")


def test_offline_texts():
    a = offline_texts(n=20, seed=0)
    assert a == offline_texts(n=20, seed=0) and a != offline_texts(n=20, seed=1)
    full = offline_texts(seed=None)
    assert len(full) > 1000 and sorted(offline_texts()) == sorted(full)
    assert all(len(t) >= 100 for t in full)
    assert sum(len(t) > 400 for t in full) < 0.05 * len(full)  # max_chars is exceeded only by glued tails
    lines = [ln.strip() for t in full for ln in t.split("\n")]
    assert not any(len(ln) >= 3 and set(ln) <= set("*=~-^#") for ln in lines)  # heading underlines removed
    with pytest.raises(ConfigError):
        offline_texts(n=10**6)
    with pytest.raises(ConfigError):
        offline_texts(min_chars=50, max_chars=10)


def test_write_cache_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(0)
    acts = {2: torch.randn(50, 4, generator=g), 7: torch.randn(50, 4, generator=g)}
    c = write_cache(tmp_path / "c", acts, token_ids=torch.arange(50), shard_tokens=16)
    assert c.layers == [2, 7] and c.n_tokens == 50 and len(c.shards) == 4
    assert torch.equal(c.load(7), acts[7]) and torch.equal(c.token_ids(), torch.arange(50))
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["shards"][3]["n_tokens"] == 2


@pytest.mark.slow
def test_offline_harvest_all_layers(tmp_path):
    """The README command: every MiniLM layer over the whole offline text."""
    cache = harvest(layers="all", out=tmp_path / "minilm", progress=False)
    assert cache.n_tokens > 100_000 and cache.layers == list(range(6))
    ActivationCache.open(tmp_path / "minilm", verify=True)


# ------------------------------------------------------------------------------ TransformerLens hook names
def _tiny(family: str, vocab: int):
    """A random 2-block model of `family`, built from a config (no download), in eval mode."""
    import transformers as tr

    torch.manual_seed(0)
    small = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=vocab,
                 max_position_embeddings=128)
    if family == "gpt2":
        return tr.GPT2LMHeadModel(tr.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128, n_ctx=128,
                                                vocab_size=vocab)).eval()
    if family == "neox":
        return tr.GPTNeoXForCausalLM(tr.GPTNeoXConfig(**small)).eval()
    if family == "llama":
        return tr.LlamaForCausalLM(tr.LlamaConfig(num_key_value_heads=2, **small)).eval()
    if family == "gemma":
        return tr.GemmaForCausalLM(tr.GemmaConfig(num_key_value_heads=2, head_dim=16, **small)).eval()
    return tr.Gemma2ForCausalLM(tr.Gemma2Config(num_key_value_heads=2, head_dim=16, **small)).eval()


POINT_NAMES = ["hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post"]


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama"])
def test_hook_names_capture_what_transformer_lens_hooks(minilm, tmp_path, family):
    """Harvest blocks.L.hook_{resid_pre, attn_out, mlp_out, resid_post} and run TransformerLens itself (a
    HookedTransformer converted from the same Hugging Face weights, no weight processing) on each text."""
    tl_mod = pytest.importorskip("transformer_lens")
    from transformer_lens.loading_from_pretrained import convert_hf_model_config, get_pretrained_state_dict

    tok = minilm[1]
    hf = _tiny(family, len(tok))
    hf.save_pretrained(tmp_path / "hf_model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = convert_hf_model_config(str(tmp_path / "hf_model"))
        cfg["tokenizer_name"] = None
        tl = tl_mod.HookedTransformer(tl_mod.HookedTransformerConfig(**cfg))
        state = get_pretrained_state_dict(str(tmp_path / "hf_model"), tl.cfg, hf_model=hf)
        tl.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                       fold_value_biases=False)
    names = [f"blocks.{b}.{p}" for b in (0, 1) for p in POINT_NAMES]
    cache = harvest((hf, tok), TEXTS, layers=names, out=tmp_path / "c", batch_size=5, progress=False)
    assert [cache.manifest["hook_names"][str(k)] for k in cache.layers] == names  # in forward order
    for i, text in enumerate(TEXTS):
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            _, tl_cache = tl.run_with_cache(ids)
        rows = cache.text_ids() == i
        for name in names:
            torch.testing.assert_close(cache.load(cache_key(cache, name))[rows], tl_cache[name][0], atol=2e-5,
                                       rtol=1e-4, msg=f"{family} {name}")


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama", "gemma", "gemma2"])
def test_hook_points_add_up_to_the_residual_stream(minilm, tmp_path, family):
    """resid_post = resid_pre + attn_out + mlp_out: TransformerLens's additive decomposition of a pre-LN block.
    For Gemma-2 it holds only for the post-sublayer norms' outputs, which is where its hook points are. Also
    the layer convention: resid_post of block l = output_hidden_states[l + 1] (blocks before the last)."""
    tok = minilm[1]
    hf = _tiny(family, len(tok))
    names = [f"blocks.{b}.{p}" for b in (0, 1) for p in POINT_NAMES]
    cache = harvest((hf, tok), TEXTS, layers=names, out=tmp_path / "c", batch_size=2, progress=False)
    get = {n: cache.load(cache_key(cache, n)) for n in names}
    for b in (0, 1):
        parts = get[f"blocks.{b}.hook_resid_pre"] + get[f"blocks.{b}.hook_attn_out"] + get[f"blocks.{b}.hook_mlp_out"]
        torch.testing.assert_close(get[f"blocks.{b}.hook_resid_post"], parts, atol=1e-4, rtol=1e-4)
    for i, text in enumerate(TEXTS):
        _, hs = _single(hf, tok, text)
        rows = cache.text_ids() == i
        torch.testing.assert_close(get["blocks.0.hook_resid_post"][rows], hs[1][0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(get["blocks.0.hook_resid_pre"][rows], hs[0][0], atol=2e-5, rtol=1e-4)
    points = cache.manifest["hook_points"]
    assert {p["hook_name"]: p["hf_hook_name"] for p in points.values()}["blocks.1.hook_mlp_out"].endswith(
        "post_feedforward_layernorm" if family == "gemma2" else "mlp")


def test_bert_hook_points_and_the_layer_convention_on_minilm(minilm, tmp_path):
    """MiniLM (post-LN): block output = hidden_states[l + 1] = TransformerLens's hook_normalized_resid_post;
    hook_resid_post is the sum before the block's last LayerNorm, = LN1(resid_pre + attn_out) + mlp_out. Several
    points of one block in one forward pass per batch."""
    model, tok = minilm
    names = [f"blocks.{b}.hook_{p}" for b in (0, 3) for p in
             ("resid_pre", "attn_out", "mlp_out", "resid_post", "normalized_resid_post")]
    calls = {"n": 0}
    handle = model.embeddings.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    try:
        cache = harvest((model, tok), TEXTS, layers=list(reversed(names)), out=tmp_path / "c", batch_size=2,
                        progress=False)
    finally:
        handle.remove()
    assert calls["n"] == 3  # 5 texts in batches of 2: one forward each, for all ten hook points
    assert cache.layers == list(range(10))  # two points share a block: positional keys, in forward order
    get = {n: cache.load(cache_key(cache, n)) for n in names}
    for b in (0, 3):
        layer = model.encoder.layer[b]
        with torch.no_grad():
            mid = layer.attention.output.LayerNorm(get[f"blocks.{b}.hook_resid_pre"] + get[f"blocks.{b}.hook_attn_out"])
            torch.testing.assert_close(get[f"blocks.{b}.hook_resid_post"], mid + get[f"blocks.{b}.hook_mlp_out"],
                                       atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(layer.output.LayerNorm(get[f"blocks.{b}.hook_resid_post"]),
                                       get[f"blocks.{b}.hook_normalized_resid_post"], atol=2e-5, rtol=1e-4)
        for i, text in enumerate(TEXTS):
            _, hs = _single(model, tok, text)
            rows = cache.text_ids() == i
            torch.testing.assert_close(get[f"blocks.{b}.hook_normalized_resid_post"][rows], hs[b + 1][0],
                                       atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(get[f"blocks.{b}.hook_resid_pre"][rows], hs[b][0], atol=2e-5, rtol=1e-4)
    rec = cache.manifest["hook_points"][str(cache_key(cache, "blocks.3.hook_resid_post"))]
    assert rec == {"hook_name": "blocks.3.hook_resid_post", "hf_hook_name": "encoder.layer.3.output.LayerNorm",
                   "hf_io": "input", "block": 3, "point": "resid_post"}
    assert cache.manifest["site"] == "hook_points" and cache.manifest["model_family"] == "bert"


def test_integer_layers_record_transformer_lens_names(minilm, tiny_gpt2, tmp_path):
    model, tok = minilm
    c = harvest((model, tok), TEXTS[:2], layers=[1, 4], out=tmp_path / "bert", dataset="demo", progress=False)
    assert c.layers == [1, 4] and c.manifest["site"] == "resid_post"
    assert c.manifest["hook_names"] == {"1": "blocks.1.hook_normalized_resid_post",
                                        "4": "blocks.4.hook_normalized_resid_post"}
    assert c.manifest["hf_hook_names"] == {"1": "encoder.layer.1", "4": "encoder.layer.4"}
    assert c.manifest["dataset"] == "demo"
    by_name = harvest((model, tok), TEXTS[:2], layers="blocks.4.hook_normalized_resid_post", out=tmp_path / "n",
                      progress=False)
    assert by_name.layers == [4] and torch.equal(by_name.load(4), c.load(4))  # the same tensor, either way
    g = harvest(tiny_gpt2, TEXTS[:2], layers=[0, 1], out=tmp_path / "gpt2", site="mlp_out", progress=False)
    assert g.manifest["hook_names"] == {"0": "blocks.0.hook_mlp_out", "1": "blocks.1.hook_mlp_out"}
    assert g.manifest["hf_hook_names"] == {"0": "transformer.h.0.mlp", "1": "transformer.h.1.mlp"}


def test_group_metadata_records_hook_model_and_dataset(minilm, tmp_path):
    from splinterp.layers import group_metadata

    model, tok = minilm
    cache = harvest((model, tok), TEXTS[:2], layers=[2, 3], out=tmp_path / "c", dataset="pydoc", progress=False)
    one = group_metadata([2], "uniform", cache)
    assert one["hook_name"] == "blocks.2.hook_normalized_resid_post" and one["hf_hook_name"] == "encoder.layer.2"
    assert one["model_name"] == cache.model_name and one["model_name"]
    assert one["dataset_path"] == "pydoc"
    two = group_metadata([2, 3], "uniform", cache)
    assert two["hook_names"] == ["blocks.2.hook_normalized_resid_post", "blocks.3.hook_normalized_resid_post"]
    assert two["hf_hook_names"] == ["encoder.layer.2", "encoder.layer.3"] and two["hook_name"] is None
    untitled = harvest((model, tok), TEXTS[:2], layers=[2], out=tmp_path / "u", progress=False)
    assert group_metadata([2], "uniform", untitled)["dataset_path"] == "user"  # the text source when unnamed
    assert sae_metadata(cache, 3) == {"model_name": one["model_name"], "dataset_path": "pydoc", "context_size": 128,
                                      "hook_name": "blocks.3.hook_normalized_resid_post",
                                      "hf_hook_name": "encoder.layer.3"}
    with pytest.raises(ConfigError, match="not in this cache"):
        sae_metadata(cache, 5)
    sae = sp.make_sae(384, 8, "topk", 2, metadata=sae_metadata(cache, 3))
    sp.save(sae, tmp_path / "sae")
    saved = json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]
    assert saved["hook_name"] == "blocks.3.hook_normalized_resid_post" and saved["dataset_path"] == "pydoc"


@pytest.mark.parametrize(
    ("layers", "match"),
    [("blocks.3.hook_resid_mid", "hook_resid_mid"), ("blocks.9.hook_resid_post", "out of range"),
     ("h.3", "TransformerLens hook name"), (["blocks.1.hook_mlp_out", 2.0], "2.0"),
     ("blocks.3.hook_normalized_resid_posts", "not a hook point harvest captures")],
)
def test_bad_hook_names_are_named(minilm, tmp_path, layers, match):
    with pytest.raises(ConfigError, match=match):
        harvest(minilm, TEXTS[:1], layers=layers, out=tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()


def test_hook_points_need_a_mapped_family(tmp_path, minilm):
    from transformers import OPTConfig, OPTForCausalLM

    tok = minilm[1]
    opt = OPTForCausalLM(OPTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, ffn_dim=64,
                                   vocab_size=len(tok), word_embed_proj_dim=32)).eval()
    with pytest.raises(ConfigError, match="not mapped for model type 'opt'"):
        harvest((opt, tok), TEXTS[:1], layers="blocks.0.hook_mlp_out", out=tmp_path / "c", progress=False)
    c = harvest((opt, tok), TEXTS[:1], layers="blocks.0.hook_resid_post", out=tmp_path / "ok", progress=False)
    assert c.manifest["hf_hook_names"] == {"0": "model.decoder.layers.0"}


# ------------------------------------------------------------------------------ bad arguments (issue 16)
def test_overwrite_replaces_only_a_cache_of_ours(minilm, tmp_path):
    """overwrite=True used to delete whatever folder `out` was: now only an empty folder or one of our caches
    (holding nothing else) is replaced, and a user's files are never touched."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    with pytest.raises(OverwriteError, match="not an activation cache"):
        harvest(minilm, TEXTS[:1], layers=0, out=home, overwrite=True, progress=False)
    assert (home / "thesis.tex").read_text() == "precious"
    with pytest.raises(OverwriteError, match="not an activation cache"):
        write_cache(home, torch.zeros(3, 4), overwrite=True)
    assert (home / "thesis.tex").read_text() == "precious"
    cache = tmp_path / "cache"
    harvest(minilm, TEXTS[:1], layers=0, out=cache, progress=False)
    (cache / "notes.md").write_text("mine")
    with pytest.raises(OverwriteError, match="notes.md"):
        harvest(minilm, TEXTS[:2], layers=0, out=cache, overwrite=True, progress=False)
    assert (cache / "notes.md").read_text() == "mine"
    (cache / "notes.md").unlink()
    assert harvest(minilm, TEXTS[:2], layers=0, out=cache, overwrite=True, progress=False).manifest["n_texts"] == 2
    (tmp_path / "file").write_text("x")
    with pytest.raises(OverwriteError, match="not a folder"):
        harvest(minilm, TEXTS[:1], layers=0, out=tmp_path / "file", overwrite=True, progress=False)
    (tmp_path / "empty").mkdir()
    harvest(minilm, TEXTS[:1], layers=0, out=tmp_path / "empty", progress=False)


@pytest.mark.parametrize("layers", [1.5, True, {0: 1}, None])
def test_layers_of_the_wrong_type_are_named(minilm, tmp_path, layers):
    with pytest.raises(ConfigError, match="layers"):
        harvest(minilm, TEXTS[:1], layers=layers, out=tmp_path / "c", progress=False)


@pytest.mark.parametrize("device", ["tpu:9", "cuda:9", "not a device", 3.5])
def test_bad_devices_are_named_before_any_work(minilm, tmp_path, device):
    if str(device).startswith("cuda") and torch.cuda.device_count() > 9:
        pytest.skip("this machine has ten GPUs")
    with pytest.raises(DeviceError, match="device="):
        harvest(minilm, TEXTS[:1], layers=0, out=tmp_path / "c", device=device, progress=False)
    assert not (tmp_path / "c").exists()


def test_max_length_beyond_the_models_positions_is_refused_up_front(minilm, tmp_path):
    """MiniLM embeds 512 positions (its config says so); a text longer than that (max_length above it) would
    fail inside the model with an index error. Refused before the model runs on it, naming the text; short
    texts with the same max_length are fine."""
    model, tok = minilm
    assert model.config.max_position_embeddings == 512
    with pytest.raises(ConfigError, match=r"text 1 has 600 tokens \(max_length=600\), more than the 512 positions"):
        harvest((model, tok), ["short.", "a " * 700], layers=1, out=tmp_path / "c", max_length=600, progress=False)
    assert not (tmp_path / "c").exists()
    harvest((model, tok), ["a " * 700], layers=1, out=tmp_path / "c", max_length=512, progress=False)
    harvest((model, tok), ["short."], layers=1, out=tmp_path / "d", max_length=600, progress=False)


def test_float16_storage_refuses_activations_beyond_its_range(tiny_gpt2, tmp_path):
    """GPT-2's residual stream is not normalised: with embeddings scaled by 1e7 its activations pass
    float16's largest value 65504; a float16 cache would hold inf. Refused, naming the hook, no folder left."""
    model, tok = tiny_gpt2
    big = copy.deepcopy(model)
    with torch.no_grad():
        big.transformer.wte.weight.mul_(1e7)
    with pytest.raises(ConfigError, match="blocks.0.hook_resid_pre.*beyond the largest float16"):
        harvest((big, tok), TEXTS[:2], layers=0, site="resid_pre", out=tmp_path / "c", dtype="float16",
                progress=False)
    assert not (tmp_path / "c").exists()
    ok = harvest((big, tok), TEXTS[:2], layers=0, site="resid_pre", out=tmp_path / "c", dtype="float32",
                 progress=False)
    assert float(ok.load(0).abs().max()) > 65504
