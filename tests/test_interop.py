"""Cross-implementation equivalence with the real SAELens, sparsify and dictionary_learning (the `interop` extra).

Every format and object splinterp reads is written (or built) by the real library, loaded with `splinterp.load`
/ `splinterp.as_sae`, and compared with the library's own encode / forward in float32, bfloat16 and float16:
the active sets must be equal bit for bit (`geometry.active_mask` and `encode` alike, tied TopK rows included),
the codes too, and the reconstructions within the dtype's tolerance (decoders sum in different orders).
Our folders load in SAELens the same way. Skipped when a library is not installed.

dictionary-learning 0.1.0 (the PyPI release) has every class the format names, MatryoshkaBatchTopKSAE included:
each run folder is written as its `trainSAE` writes it (`trainer.config` into config.json, the state dict into
ae.pt) and compared with what its own `utils.load_dictionary` loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

import splinterp as sp
from splinterp.io import load
from splinterp.metrics import evaluate

SAELENS_REASON = "sae-lens is not installed (pip install -e '.[interop]')"
SPARSIFY_REASON = "eai-sparsify is not installed (pip install -e '.[interop]')"
DL_REASON = "dictionary-learning is not installed (pip install -e '.[interop]')"
DTYPES = ["float32", "bfloat16", "float16"]
TORCH_DTYPES = sp.sae.DTYPES
TOL = {"float32": dict(atol=1e-4, rtol=1e-4), "float64": dict(atol=1e-10, rtol=1e-10),
       "bfloat16": dict(atol=0.25, rtol=0.05), "float16": dict(atol=0.03, rtol=0.01)}
"""Reconstructions: the decoders sum the k terms in different orders, so half precision differs by a few ulps
of the largest term (outputs are O(10) here)."""
D_IN, D_SAE, K = 64, 256, 16  # large enough that half-precision rounding changes active sets if done differently
N = 400


@pytest.fixture(scope="module")
def saelens():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("sae_lens", reason=SAELENS_REASON)


@pytest.fixture(scope="module")
def sparsify():
    if not torch.cuda.is_available():
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder needs a GPU
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = pytest.importorskip("sparsify", reason=SPARSIFY_REASON)
    if not torch.cuda.is_available():  # imported earlier by someone else: pick the CPU decoder explicitly
        import sparsify.sparse_coder
        import sparsify.utils

        sparsify.sparse_coder.decoder_impl = sparsify.utils.eager_decode
    return mod


@pytest.fixture(scope="module")
def dl():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pytest.importorskip("dictionary_learning", reason=DL_REASON)
        import dictionary_learning.utils
    return dictionary_learning


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Random weights with non-zero biases (and a large b_dec, so folding it would round differently);
    thresholds in [0, 0.5) so JumpReLU latents both fire and don't."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if "threshold" in name:
                r = torch.rand(p.shape, generator=g, dtype=torch.float64) * 0.5
            elif name == "r_mag":
                r = r * 0.3
            elif name in ("b_dec", "bias", "decoder_bias", "decoder.bias"):
                r = r * 2.0
            elif "bias" in name or name.startswith("b_"):
                r = r * 0.5
            elif p.ndim == 2:
                r = r / 4
            p.copy_(r.to(p.dtype))


def data(dtype: str, n: int = N, seed: int = 7, d: int = D_IN) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * 3).to(TORCH_DTYPES[dtype])


def assert_same(ours: sp.SAE, lib_encode, lib_forward, x: torch.Tensor, dtype: str) -> None:
    """Equal codes and active sets (bit for bit: encode, the sparse and dense paths, the geometry); outputs close."""
    with torch.no_grad():
        z_lib = lib_encode(x)
        active = z_lib != 0
        assert 0 < int(active.sum()) < active.numel()  # the comparison is not vacuous
        assert torch.equal(sp.geometry.active_mask(ours, x), active)
        assert torch.equal(ours.encode(x), z_lib)
        assert torch.equal(ours.encode(x, dense=True), z_lib)
        torch.testing.assert_close(ours(x), lib_forward(x), **TOL[dtype])


def tied_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Rows whose k-th and (k+1)-th largest scores are exactly equal (where torch.topk's pick matters)."""
    s = scores.float().sort(-1, descending=True).values
    return s[:, k - 1] == s[:, k]


# ================================================================================================ SAELens
SAELENS_TO_OURS = {"standard": "relu", "topk": "topk", "abstopk": "topk_abs", "jumprelu": "jumprelu",
                   "gated": "gated"}


def saelens_sae(saelens, arch: str, dtype: str, seed: int = 0, training: bool = False, **kw):
    names = {"standard": "Standard", "topk": "TopK", "abstopk": "AbsTopK", "jumprelu": "JumpReLU", "gated": "Gated"}
    base = names[arch] + ("TrainingSAE" if training else "SAE")
    cls, cfg_cls = getattr(saelens, base), getattr(saelens, base + "Config")
    if isinstance(kw.get("metadata"), dict):
        from sae_lens.saes.sae import SAEMetadata

        kw["metadata"] = SAEMetadata(**kw["metadata"])
    if arch in ("topk", "abstopk"):
        kw.setdefault("k", K)
        if training:
            kw.setdefault("rescale_acts_by_decoder_norm", False)
    sae = cls(cfg_cls(d_in=kw.pop("d_in", D_IN), d_sae=D_SAE, dtype=dtype, **kw))
    randomise(sae, seed)
    return sae


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("arch", list(SAELENS_TO_OURS))
def test_saelens_folder_loads_with_equal_active_sets(saelens, tmp_path, arch, apply_b_dec, dtype):
    ref = saelens_sae(saelens, arch, dtype, apply_b_dec_to_input=apply_b_dec, metadata={"hook_name": "h"})
    ref.save_model(tmp_path / "sae")
    ours = load(tmp_path / "sae")
    assert ours.architecture == SAELENS_TO_OURS[arch]
    assert (ours.cfg.apply_b_dec_to_input, ours.cfg.dtype) == (apply_b_dec, dtype)
    assert ours.cfg.metadata["hook_name"] == "h" and ours.cfg.metadata.get("sae_lens_version")
    x = data(dtype)
    assert_same(ours, ref.encode, ref.forward, x, dtype)
    if arch in ("topk", "abstopk") and dtype != "float32":  # ties are real in half precision, and handled
        with torch.no_grad():
            u = ref.process_sae_in(x) @ ref.W_enc + ref.b_enc
        assert int(tied_rows(u.abs() if arch == "abstopk" else u, K).sum()) > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("arch", list(SAELENS_TO_OURS))
def test_saelens_objects_convert_with_equal_active_sets(saelens, arch, training, dtype):
    ref = saelens_sae(saelens, arch, dtype, seed=1, training=training)
    ours = sp.as_sae(ref)
    assert ours.architecture == SAELENS_TO_OURS[arch] and ours.dtype == TORCH_DTYPES[dtype]
    assert_same(ours, ref.encode, lambda x: ref.decode(ref.encode(x)), data(dtype, seed=8), dtype)
    assert sp.as_sae(ref) is ours and sp.as_sae(ours) is ours  # cheap and idempotent while nothing changed
    with torch.no_grad():
        ref.b_dec.add_(1.0)
    changed = sp.as_sae(ref)
    assert changed is not ours and torch.equal(changed.b_dec, ref.b_dec)


def test_saelens_topk_training_sae_with_decoder_norm_rescaling_is_folded(saelens):
    """TopKTrainingSAE rescales scores by |W_dec_i| at run time; we fold it (as SAELens's inference save does):
    the same function, up to float32 rounding."""
    ref = saelens_sae(saelens, "topk", "float32", training=True, rescale_acts_by_decoder_norm=True)
    with torch.no_grad():
        ref.W_dec.mul_(torch.linspace(0.2, 3.0, D_SAE)[:, None])
    ours = sp.as_sae(ref)
    x = data("float32")
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), ref.encode(x), **TOL["float32"])
        torch.testing.assert_close(ours(x), ref.decode(ref.encode(x)), **TOL["float32"])


@pytest.mark.parametrize("arch", ["topk", "abstopk"])
def test_saelens_rescale_acts_by_decoder_norm_is_folded(saelens, tmp_path, arch):
    ref = saelens_sae(saelens, arch, "float64", rescale_acts_by_decoder_norm=True)
    with torch.no_grad():  # decoder rows far from unit norm, so the rescaling matters
        ref.W_dec.mul_(torch.linspace(0.2, 3.0, D_SAE, dtype=torch.float64)[:, None])
    ref.save_model(tmp_path / "sae")
    ours = load(tmp_path / "sae")
    x = data("float64")
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), ref.encode(x), **TOL["float64"])
        torch.testing.assert_close(ours(x), ref(x), **TOL["float64"])
    torch.testing.assert_close(ours.W_dec.norm(dim=1), torch.ones(D_SAE, dtype=torch.float64))


def test_saelens_default_apply_b_dec_is_true(saelens, tmp_path):
    """A cfg.json without apply_b_dec_to_input means True, as SAELens reads it."""
    ref = saelens_sae(saelens, "standard", "float32", apply_b_dec_to_input=True)
    ref.save_model(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    del cfg["apply_b_dec_to_input"]
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    assert load(tmp_path / "sae").cfg.apply_b_dec_to_input is True
    assert_same(load(tmp_path / "sae"), ref.encode, ref.forward, data("float32"), "float32")


def test_saelens_negative_jumprelu_threshold_matches(saelens, tmp_path):
    """SAELens computes relu(u) * [u > t]; with t < 0 that is u * [u > 0], which the clamp on load gives."""
    ref = saelens_sae(saelens, "jumprelu", "float32")
    with torch.no_grad():
        ref.threshold.sub_(0.4)
    assert bool((ref.threshold < 0).any())
    ref.save_model(tmp_path / "sae")
    assert_same(load(tmp_path / "sae"), ref.encode, ref.forward, data("float32"), "float32")


@pytest.mark.parametrize("cls_name", ["BatchTopKTrainingSAE", "MatryoshkaBatchTopKTrainingSAE"])
def test_saelens_batchtopk_checkpoint_loads_as_its_inference_jumprelu(saelens, tmp_path, cls_name):
    cls = getattr(saelens, cls_name)
    cfg_cls = getattr(saelens, cls_name + "Config")
    kw = {"matryoshka_widths": [64, D_SAE]} if "Matryoshka" in cls_name else {}
    train = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, k=3, rescale_acts_by_decoder_norm=True, dtype="float64", **kw))
    randomise(train, 3)
    with torch.no_grad():
        train.W_dec.mul_(torch.linspace(0.5, 2.0, D_SAE, dtype=torch.float64)[:, None])
        train.topk_threshold.fill_(0.3)
    train.save_model(tmp_path / "ckpt")
    train.save_inference_model(tmp_path / "inference")
    ref = saelens.SAE.load_from_disk(tmp_path / "inference")
    assert ref.cfg.architecture() == "jumprelu"
    x = data("float64")
    for source in (tmp_path / "ckpt", tmp_path / "inference", train):
        ours = sp.as_sae(source) if isinstance(source, torch.nn.Module) else load(source)
        assert ours.architecture == "jumprelu"
        with torch.no_grad():
            torch.testing.assert_close(ours.encode(x), ref.encode(x), **TOL["float64"])
            torch.testing.assert_close(ours(x), ref(x), **TOL["float64"])


def test_saelens_expected_average_only_in_is_folded_from_activation_scaler(saelens, tmp_path):
    ref = saelens_sae(saelens, "standard", "float64", normalize_activations="expected_average_only_in")
    ref.save_model(tmp_path / "sae")
    s = 2.5
    (tmp_path / "sae" / "activation_scaler.json").write_text(json.dumps({"scaling_factor": s, "has_whitening": False}))
    ours = load(tmp_path / "sae")  # takes raw activations: the scale is folded in
    assert ours.cfg.metadata["norm_scaling_factor"] == s
    x = data("float64")
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), ref.encode(x * s), **TOL["float64"])
        torch.testing.assert_close(ours(x), ref(x * s) / s, **TOL["float64"])


def test_saelens_expected_average_only_in_without_factor_warns(saelens, tmp_path):
    ref = saelens_sae(saelens, "standard", "float64", normalize_activations="expected_average_only_in")
    ref.save_model(tmp_path / "sae")
    with pytest.warns(UserWarning, match="expected_average_only_in"):
        ours = load(tmp_path / "sae")
    assert ours.cfg.metadata["normalize_activations"] == "expected_average_only_in"
    assert_same(ours, ref.encode, ref.forward, data("float64"), "float64")


@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("arch", ["standard", "gated", "jumprelu"])
def test_saelens_covariance_whitening_is_folded_exactly(saelens, tmp_path, arch, apply_b_dec, with_scale):
    """A checkpoint trained on whitened inputs (SAELens's ActivationScaler: z = (s x - mean) @ M, and back) loads as
    an SAE on raw activations, equal to scale -> SAE -> unscale, and to SAELens's own fold_activation_whitening.
    Before, it loaded unfolded under a warning that said "no scaling factor"."""
    from sae_lens.training.activation_scaler import ActivationScaler

    g = torch.Generator().manual_seed(4)
    mix = torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64)
    acts = iter([torch.randn(256, D_IN, generator=g, dtype=torch.float64) @ mix + 3.0 for _ in range(8)])
    scaler = ActivationScaler(scaling_factor=0.7 if with_scale else None)
    scaler.estimate_whitening(D_IN, acts, n_batches_for_norm_estimate=8)
    ref = saelens_sae(saelens, arch, "float64", apply_b_dec_to_input=apply_b_dec,
                      normalize_activations="covariance_whitening")
    ref.save_model(tmp_path / "sae")
    scaler.save(str(tmp_path / "sae" / "activation_scaler.json"))  # also writes activation_whitening.safetensors
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not folded" warning
        ours = load(tmp_path / "sae")
    assert ours.cfg.metadata["folded_whitening"] is True
    x = data("float64") @ mix
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), ref.encode(scaler.scale(x)), **TOL["float64"])
        torch.testing.assert_close(ours(x), scaler.unscale(ref(scaler.scale(x))), **TOL["float64"])
        if not with_scale:  # SAELens's own fold (it folds the whitening alone)
            folded = saelens.SAE.load_from_disk(tmp_path / "sae")
            w = scaler.whitening
            folded.fold_activation_whitening(w.mean, w.matrix, w.inverse_matrix)
            torch.testing.assert_close(ours(x), folded(x), **TOL["float64"])


def test_saelens_layer_norm_is_refused(saelens, tmp_path):
    ref = saelens_sae(saelens, "standard", "float32", normalize_activations="layer_norm")
    ref.save_model(tmp_path / "sae")
    with pytest.raises(sp.errors.ConfigError, match="layer_norm"):
        load(tmp_path / "sae")


def test_saelens_pre_6_folder_keeps_hook_and_model_names(saelens, tmp_path):
    """A cfg.json as SAELens < 6 wrote it (hook_point, model_name at the top, activation_fn_kwargs, a boolean
    normalize_activations): its hook_name and model_name come back, as SAELens's own reader gives them."""
    ref = saelens_sae(saelens, "topk", "float32")
    ref.save_model(tmp_path / "sae")
    legacy = {"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
              "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
              "hook_point": "blocks.3.hook_resid_pre", "hook_point_layer": 3, "model_name": "gpt2-small",
              "dataset_path": "Skylion007/openwebtext",
              "context_size": 128, "normalize_activations": False, "apply_b_dec_to_input": True,
              "sae_lens_training_version": "3.12.0"}
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(legacy))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = saelens.SAE.load_from_disk(tmp_path / "sae")
    ours = load(tmp_path / "sae")
    assert (ours.architecture, ours.k) == ("topk", K)
    for key in ("hook_name", "model_name", "dataset_path", "context_size"):
        assert ours.cfg.metadata[key] == getattr(theirs.cfg.metadata, key), key
    assert ours.cfg.metadata["hook_name"] == "blocks.3.hook_resid_pre"
    assert_same(ours, theirs.encode, theirs.forward, data("float32"), "float32")
    legacy["normalize_activations"] = True  # = expected_average_only_in: no factor here, so a warning
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(legacy))
    with pytest.warns(UserWarning, match="expected_average_only_in"):
        load(tmp_path / "sae")


@pytest.mark.parametrize("dtype", DTYPES)
def test_saelens_hook_z_sae_takes_heads_input(saelens, tmp_path, dtype):
    ref = saelens_sae(saelens, "jumprelu", dtype, reshape_activations="hook_z",
                      metadata={"hook_name": "blocks.2.attn.hook_z"})
    ref.save_model(tmp_path / "sae")
    ours = load(tmp_path / "sae")
    assert ours.cfg.reshape_activations == "hook_z"
    x = data(dtype).reshape(N // 4, 4, 8, 8)  # [batch, pos, n_heads, d_head], n_heads * d_head = d_in
    with torch.no_grad():
        assert torch.equal(ours.encode(x), ref.encode(x))
        out = ours(x)
        assert out.shape == x.shape
        torch.testing.assert_close(out, ref(x), **TOL[dtype])
    sp.save(ours, tmp_path / "ours")
    assert load(tmp_path / "ours").cfg.reshape_activations == "hook_z"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert saelens.SAE.load_from_disk(tmp_path / "ours").cfg.reshape_activations == "hook_z"


# ------------------------------------------------------------------------------------ splinterp -> SAELens
def our_sae(arch: str, dtype: str, seed: int = 0, **kw) -> sp.SAE:
    sae = sp.SAE(sp.SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=arch, k=K if "topk" in arch else None,
                              dtype=dtype, seed=seed, **kw))
    randomise(sae, seed + 11)
    return sae


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("arch", ["relu", "topk", "topk_abs", "jumprelu", "gated"])
def test_our_folder_loads_in_saelens_with_equal_active_sets(saelens, tmp_path, arch, apply_b_dec, dtype, tied):
    """SAELens computes our scores bit for bit. TopK: our default tie rule takes the lowest index and SAELens
    whatever torch.topk picks, so rows with an exact tie at the k-th score may differ (in the tied latents only);
    an SAE with topk_ties="torch" agrees on those rows too."""
    ours = our_sae(arch, dtype, apply_b_dec_to_input=apply_b_dec, tied=tied, metadata={"hook_name": "blocks.3"})
    sp.save(ours, tmp_path / "sae")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = saelens.SAE.load_from_disk(tmp_path / "sae")
    assert ref.cfg.architecture() == {"relu": "standard", "topk_abs": "abstopk"}.get(arch, arch)
    assert ref.cfg.apply_b_dec_to_input is apply_b_dec
    assert ref.cfg.metadata.hook_name == "blocks.3"  # read as a SAELens 6 config, metadata kept
    x = data(dtype)
    if arch not in ("topk", "topk_abs"):
        assert_same(ours, ref.encode, ref.forward, x, dtype)
        return
    with torch.no_grad():
        u = ours.pre_acts(x)
        assert torch.equal(u, ref.process_sae_in(x) @ ref.W_enc + ref.b_enc)  # the very same scores
        tie = tied_rows(u.abs() if arch == "topk_abs" else u, K)
        z, z_ref = ours.encode(x), ref.encode(x)
        assert torch.equal(z[~tie], z_ref[~tie])
        torch.testing.assert_close(ours(x)[~tie], ref(x)[~tie], **TOL[dtype])
        torch_ties = our_sae(arch, dtype, apply_b_dec_to_input=apply_b_dec, tied=tied, topk_ties="torch")
        assert torch.equal(torch_ties.encode(x), z_ref)


def test_saelens_resave_of_our_folder_loads_back(saelens, tmp_path):
    """SAELens re-saving our folder drops our block; it still loads, as the same SAE."""
    ours = our_sae("topk", "float32", apply_b_dec_to_input=True)
    sp.save(ours, tmp_path / "a")
    saelens.SAE.load_from_disk(tmp_path / "a").save_model(tmp_path / "b")
    back = load(tmp_path / "b")
    for name, t in sp.io.state_tensors(ours).items():
        assert torch.equal(getattr(back, name), t)


def test_metrics_and_save_take_library_objects(saelens, tmp_path):
    ref = saelens_sae(saelens, "jumprelu", "float32")
    x = data("float32")
    assert evaluate(ref, x) == evaluate(sp.as_sae(ref), x)
    sp.save(ref, tmp_path / "sae")
    assert_same(load(tmp_path / "sae"), ref.encode, ref.forward, x, "float32")


def test_geometry_takes_library_objects_directly(saelens, sparsify):
    """Every public geometry function accepts another library's SAE object as it is: the active sets are the
    library's own (nonzero codes), and each answer equals the one for the converted SAE."""
    from splinterp import geometry as G
    from splinterp.errors import NotAModelError

    x = data("float32", n=64)
    for ref, encode in [(saelens_sae(saelens, "jumprelu", "float32", seed=3), None),
                        (saelens_sae(saelens, "topk", "float32", seed=4), None),
                        (sparsify_sae(sparsify, torch.float32, seed=5), _sparsify_fns)]:
        ours = sp.as_sae(ref)
        with torch.no_grad():
            z = encode(ref)[0](x) if encode else ref.encode(x)
        assert torch.equal(G.active_mask(ref, x), z != 0)
        assert torch.equal(G.region_ids(ref, x), G.region_ids(ours, x))
        torch.testing.assert_close(G.affine_map(ref, z[0] != 0)[0], G.affine_map(ours, z[0] != 0)[0])
        plane = G.plane_through(x[0], x[1], x[2])
        assert torch.equal(G.slice_2d(ref, plane).masks, G.slice_2d(ours, plane).masks)
        assert G.region_is_nonempty(ref, z[0] != 0)[0]
    with pytest.raises(NotAModelError, match="sae must be a splinterp SAE, got str"):
        G.region_ids("not an SAE", x)


# ================================================================================================ sparsify
def sparsify_sae(sparsify, dtype: torch.dtype, seed: int = 0, **cfg_kw):
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(D_IN, SparseCoderConfig(**{"k": K, "num_latents": D_SAE, **cfg_kw}), dtype=dtype)
    randomise(sae, seed)
    return sae


def _sparsify_fns(sae):
    def dense(x):
        out = sae.encode(x)
        z = torch.zeros(x.shape[0], sae.num_latents, dtype=out.top_acts.dtype)
        return z.scatter_(-1, out.top_indices, out.top_acts)

    return dense, lambda x: sae(x).sae_out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg_kw", [{}, {"num_latents": 0, "expansion_factor": 4}])
def test_sparsify_folder_loads_with_equal_active_sets(sparsify, tmp_path, dtype, cfg_kw):
    ref = sparsify_sae(sparsify, TORCH_DTYPES[dtype], **cfg_kw)
    ref.save_to_disk(tmp_path / "layers.3")
    ours = load(tmp_path / "layers.3")
    assert (ours.architecture, ours.k, ours.cfg.apply_b_dec_to_input) == ("topk", K, True)
    assert ours.cfg.d_sae == ref.num_latents and ours.dtype == TORCH_DTYPES[dtype]
    assert ours.cfg.metadata["hf_hook_name"] == "layers.3"  # sparsify's hookpoint is the folder name
    encode, forward = _sparsify_fns(ref)
    assert_same(ours, encode, forward, data(dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparsify_object_converts_with_equal_active_sets(sparsify, dtype):
    ref = sparsify_sae(sparsify, TORCH_DTYPES[dtype], seed=2)
    encode, forward = _sparsify_fns(ref)
    assert_same(sp.as_sae(ref), encode, forward, data(dtype, seed=9), dtype)


def test_sparsify_multi_topk_warns_and_offers_the_4k_decode(sparsify, tmp_path):
    """sparsify's forward of a multi_topk SAE decodes with its 4k largest latents (encode selects k)."""
    ref = sparsify_sae(sparsify, torch.float32, multi_topk=True)
    ref.save_to_disk(tmp_path / "sae")
    with pytest.warns(UserWarning, match=f"k={K} \\(encode's\\).*k={4 * K}"):
        ours = load(tmp_path / "sae")
    encode, forward = _sparsify_fns(ref)
    assert_same(ours, encode, lambda x: ref.decode(*ref.encode(x)[:2]), data("float32"), "float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        four_k = load(tmp_path / "sae", k=4 * K)
    x = data("float32")
    with torch.no_grad():
        torch.testing.assert_close(four_k(x), forward(x), **TOL["float32"])
        assert not torch.allclose(ours(x), forward(x), **TOL["float32"])  # the two decodes really differ


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b_dec_in", [True, False])
def test_our_sparsify_export_loads_in_sparsify_with_equal_active_sets(sparsify, tmp_path, b_dec_in, dtype):
    ours = sp.make_sae(D_IN, D_SAE, "topk", K, apply_b_dec_to_input=b_dec_in, dtype=dtype)
    randomise(ours, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sp.save(ours, tmp_path / "sae", format="sparsify")
    ref = sparsify.SparseCoder.load_from_disk(tmp_path / "sae")
    assert ref.num_latents == D_SAE and ref.cfg.k == K and ref.dtype == TORCH_DTYPES[dtype]
    encode, forward = _sparsify_fns(ref)
    assert_same(load(tmp_path / "sae"), encode, forward, data(dtype), dtype)  # read back: sparsify's order
    if dtype == "float32" and b_dec_in:  # and the same function as the SAE we exported
        with torch.no_grad():
            torch.testing.assert_close(forward(data(dtype)), ours(data(dtype)), **TOL[dtype])


def test_sparsify_export_names_what_is_lost(sparsify, tmp_path):
    ours = sp.make_sae(D_IN, D_SAE, "topk", K, tied=True, metadata={"hook_name": "blocks.3.hook_resid_post"})
    with pytest.warns(UserWarning, match=r"tied.*apply_b_dec_to_input=False.*hook_name.*blocks\.3\.hook_resid_post"):
        sp.save(ours, tmp_path / "sae", format="sparsify")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing lost: no warning
        sp.save(sp.make_sae(D_IN, D_SAE, "topk", K, apply_b_dec_to_input=True), tmp_path / "b", format="sparsify")


def test_sparsify_load_many_is_naturally_sorted(sparsify, tmp_path):
    for i in (10, 2, 1):
        sparsify_sae(sparsify, torch.float32, seed=i).save_to_disk(tmp_path / f"layers.{i}")
    saes = sp.io.load_many(tmp_path)
    assert list(saes) == ["layers.1", "layers.2", "layers.10"]
    assert torch.equal(sp.load(tmp_path, sae_id="layers.2").W_enc, saes["layers.2"].W_enc)
    with pytest.raises(sp.errors.NotAnSAEFolderError, match="load_many"):
        load(tmp_path)


@pytest.mark.parametrize(
    ("cfg_kw", "match"),
    [({"skip_connection": True}, "skip"), ({"transcode": True}, "transcoder"),
     ({"activation": "groupmax"}, "groupmax")],
)
def test_sparsify_unsupported_variants_are_refused(sparsify, tmp_path, cfg_kw, match):
    sparsify_sae(sparsify, torch.float32, **cfg_kw).save_to_disk(tmp_path / "sae")
    with pytest.raises(sp.errors.ConfigError, match=match):
        load(tmp_path / "sae")
    with pytest.raises(sp.errors.ConfigError, match=match):
        sp.as_sae(sparsify_sae(sparsify, torch.float32, **cfg_kw))


# ================================================================================================ dictionary_learning
DL_CLASSES = ["AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder",
              "GatedAutoEncoder"]
DL_OURS = {"AutoEncoder": "relu", "AutoEncoderTopK": "topk", "BatchTopKSAE": "jumprelu",
           "MatryoshkaBatchTopKSAE": "jumprelu", "JumpReluAutoEncoder": "jumprelu", "GatedAutoEncoder": "gated"}


def dl_trainer(dl, dict_class: str, seed: int = 0):
    """The trainer dictionary_learning's trainSAE would build for `dict_class`, its AE randomised (not trained)."""
    from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
    from dictionary_learning.trainers.gdm import GatedSAETrainer
    from dictionary_learning.trainers.jumprelu import JumpReluTrainer
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer
    from dictionary_learning.trainers.standard import StandardTrainer
    from dictionary_learning.trainers.top_k import TopKTrainer

    common = dict(steps=10_000, activation_dim=D_IN, dict_size=D_SAE, layer=3, lm_name="EleutherAI/pythia-70m-deduped",
                  submodule_name="resid_post_layer_3", device="cpu", seed=seed)
    trainer = {
        "AutoEncoder": lambda: StandardTrainer(**common),
        "AutoEncoderTopK": lambda: TopKTrainer(k=K, **common),
        "BatchTopKSAE": lambda: BatchTopKTrainer(k=K, **common),
        "MatryoshkaBatchTopKSAE": lambda: MatryoshkaBatchTopKTrainer(k=K, group_fractions=[0.25, 0.75], **common),
        "JumpReluAutoEncoder": lambda: JumpReluTrainer(**common),
        "GatedAutoEncoder": lambda: GatedSAETrainer(**common),
    }[dict_class]()
    assert type(trainer.ae).__name__ == dict_class
    randomise(trainer.ae, seed + 5)
    if hasattr(trainer.ae, "threshold") and not isinstance(trainer.ae.threshold, torch.nn.Parameter):
        trainer.ae.threshold.fill_(0.3)  # BatchTopK's learned global threshold (a buffer)
    return trainer


def dl_folder(trainer, folder) -> None:
    """What dictionary_learning.training.trainSAE writes for one trainer."""
    folder.mkdir(parents=True)
    config = {"trainer": trainer.config, "buffer": {"d_submodule": D_IN, "io": "out", "n_ctxs": 30, "ctx_len": 128,
                                                    "refresh_batch_size": 8, "out_batch_size": 64, "device": "cpu"}}
    (folder / "config.json").write_text(json.dumps(config, indent=4))
    torch.save({k: v.cpu() for k, v in trainer.ae.state_dict().items()}, folder / "ae.pt")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dict_class", DL_CLASSES)
def test_dictionary_learning_folder_loads_like_load_dictionary(dl, tmp_path, dict_class, dtype):
    dl_folder(dl_trainer(dl, dict_class), tmp_path / "trainer_0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, _ = dl.utils.load_dictionary(str(tmp_path / "trainer_0"), device="cpu")  # the library's own loader
    ref = ref.to(TORCH_DTYPES[dtype])
    ours = load(tmp_path / "trainer_0", dtype=dtype)
    assert ours.architecture == DL_OURS[dict_class] and ours.dtype == TORCH_DTYPES[dtype]
    assert ours.cfg.metadata["model_name"] == "EleutherAI/pythia-70m-deduped" and ours.cfg.metadata["layer"] == 3
    assert_same(ours, ref.encode, ref.forward, data(dtype), dtype)
    if dict_class == "AutoEncoder":  # its loader normalised the decoder columns; so did we
        assert ours.cfg.metadata["decoder_normalized_on_load"] is True


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dict_class", [*DL_CLASSES, "JumpReluAutoEncoder-b_dec"])
def test_dictionary_learning_objects_convert_with_equal_active_sets(dl, dict_class, dtype):
    name = dict_class.removesuffix("-b_dec")
    ae = dl_trainer(dl, name, seed=1).ae.to(TORCH_DTYPES[dtype])
    if dict_class.endswith("-b_dec"):
        ae.apply_b_dec_to_input = True  # as its from_pretrained(load_from_sae_lens=True) sets it
    ours = sp.as_sae(ae)
    assert ours.cfg.apply_b_dec_to_input is (name != "JumpReluAutoEncoder" or dict_class.endswith("-b_dec"))
    assert_same(ours, ae.encode, ae.forward, data(dtype, seed=10), dtype)


def test_dictionary_learning_folder_problems(dl, tmp_path):
    dl_folder(dl_trainer(dl, "AutoEncoderTopK"), tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["trainer"]["k"] = K + 1
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(sp.errors.CorruptFileError, match="k buffer"):
        load(tmp_path / "a")
    cfg["trainer"]["dict_class"] = "CrossCoder"
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(sp.errors.ConfigError, match="CrossCoder.*supported"):
        load(tmp_path / "a")


# ================================================================================================ Gemma Scope
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemma_scope_npz_loads_as_saelens_builds_it(saelens, tmp_path, dtype):
    """SAELens's Gemma Scope loader: the npz arrays as float32, a JumpReLU SAE with apply_b_dec_to_input=False."""
    g = torch.Generator().manual_seed(0)
    arrays = {"W_enc": torch.randn(D_IN, D_SAE, generator=g) / 4, "W_dec": torch.randn(D_SAE, D_IN, generator=g) / 4,
              "b_enc": torch.randn(D_SAE, generator=g) * 0.5, "b_dec": torch.randn(D_IN, generator=g) * 2,
              "threshold": torch.rand(D_SAE, generator=g) * 0.5}
    np.savez(tmp_path / "params.npz", **{n: a.numpy() for n, a in arrays.items()})
    ref = saelens.JumpReLUSAE(saelens.JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False))
    ref.load_state_dict(arrays)
    ref = ref.to(TORCH_DTYPES[dtype])
    for source in (tmp_path / "params.npz", tmp_path):
        ours = load(source, dtype=dtype)
        assert ours.architecture == "jumprelu" and not ours.cfg.apply_b_dec_to_input
        assert_same(ours, ref.encode, ref.forward, data(dtype), dtype)


# ================================================================================================ pretrained releases
def test_pretrained_release_loads_offline_from_a_hugging_face_cache(saelens, tmp_path):
    """`load(release, sae_id=...)` goes through SAELens's from_pretrained and huggingface_hub with HF_HUB_OFFLINE=1,
    reading a cache laid out as the hub lays it out (models--org--name/snapshots/<rev>/..., refs/main). Run in a
    fresh process: huggingface_hub reads the cache location and offline flag when it is imported."""
    release, sae_id, repo = "gpt2-small-res-jb", "blocks.0.hook_resid_pre", "jbloom/GPT2-Small-SAEs-Reformatted"
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    ref = saelens_sae(saelens, "standard", "float32", metadata={"hook_name": sae_id, "model_name": "gpt2-small"})
    ref.save_model(repo_dir / "snapshots" / rev / sae_id)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(rev)
    script = textwrap.dedent(f"""
        import json, warnings
        warnings.simplefilter("ignore")
        import torch, splinterp as sp
        from sae_lens import SAE
        sae = sp.load({release!r}, sae_id={sae_id!r})
        folder = {str(repo_dir / "snapshots" / rev / sae_id)!r}
        ref = SAE.load_from_disk(folder)
        x = torch.randn(64, {D_IN}, generator=torch.Generator().manual_seed(0)) * 3
        with torch.no_grad():
            same = torch.equal(sae.encode(x), ref.encode(x)) and torch.equal(sp.geometry.active_mask(sae, x),
                                                                               ref.encode(x) != 0)
        try:
            sp.load({release!r}, sae_id="blocks.99.hook_resid_pre")
            missing = "loaded"
        except sp.errors.SplinterpError as e:
            missing = type(e).__name__ + ": " + str(e)
        print(json.dumps({{"same": same, "meta": sae.cfg.metadata, "missing": missing}}))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["same"] is True
    assert res["meta"]["release"] == release and res["meta"]["sae_id"] == sae_id
    assert res["meta"]["hook_name"] == sae_id and res["meta"]["model_name"] == "gpt2-small"
    assert res["missing"].startswith("NotAnSAEFolderError") and "blocks.99" in res["missing"]
