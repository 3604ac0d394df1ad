"""Cross-implementation equivalence with the real SAELens and sparsify (the `interop` extra).

Folders written by each library load with `splinterp.load` and give the library's own encode / decode /
forward to 1e-5; our folders load in SAELens with equal outputs. Skipped when a library is not installed.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

import splinterp as sp
from splinterp.io import load

SAELENS_REASON = "sae-lens is not installed (pip install -e '.[interop]')"
SPARSIFY_REASON = "eai-sparsify is not installed (pip install -e '.[interop]')"
TOL = {"float32": dict(atol=1e-5, rtol=1e-5), "float64": dict(atol=1e-10, rtol=1e-10)}
D_IN, D_SAE, K = 6, 24, 4


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


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Random weights with non-zero biases; thresholds in [0, 0.5) so JumpReLU latents both fire and don't."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if name == "threshold":
                r = torch.rand(p.shape, generator=g, dtype=torch.float64) * 0.5
            elif name == "r_mag":
                r = r * 0.3
            elif "bias" in name or name.startswith("b_"):
                r = r * 0.5
            p.copy_(r.to(p.dtype))


def data(dtype: str, n: int = 64, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g, dtype=torch.float64).to(sp.sae.DTYPES[dtype]) * 1.5


def assert_same(ours: sp.SAE, encode, decode, forward, x: torch.Tensor, dtype: str) -> None:
    with torch.no_grad():
        z_ref = encode(x)
        torch.testing.assert_close(ours.encode(x), z_ref, **TOL[dtype])
        torch.testing.assert_close(ours.decode(z_ref), decode(z_ref), **TOL[dtype])
        torch.testing.assert_close(ours(x), forward(x), **TOL[dtype])
        assert int((z_ref != 0).sum()) > 0  # the comparison is not vacuous


def saelens_sae(saelens, arch: str, dtype: str, seed: int = 0, **kw):
    classes = {
        "standard": (saelens.StandardSAE, saelens.StandardSAEConfig),
        "topk": (saelens.TopKSAE, saelens.TopKSAEConfig),
        "abstopk": (saelens.AbsTopKSAE, saelens.AbsTopKSAEConfig),
        "jumprelu": (saelens.JumpReLUSAE, saelens.JumpReLUSAEConfig),
        "gated": (saelens.GatedSAE, saelens.GatedSAEConfig),
    }
    cls, cfg_cls = classes[arch]
    if arch in ("topk", "abstopk"):
        kw.setdefault("k", K)
    sae = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, dtype=dtype, **kw))
    randomise(sae, seed)
    return sae


# ------------------------------------------------------------------------------------ SAELens -> splinterp
SAELENS_TO_OURS = {"standard": "relu", "topk": "topk", "abstopk": "topk_abs", "jumprelu": "jumprelu",
                   "gated": "gated"}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("arch", list(SAELENS_TO_OURS))
def test_saelens_folder_loads_with_equal_outputs(saelens, tmp_path, arch, apply_b_dec, dtype):
    ref = saelens_sae(saelens, arch, dtype, apply_b_dec_to_input=apply_b_dec)
    ref.save_model(tmp_path / "sae")
    ours = load(tmp_path / "sae")
    assert ours.architecture == SAELENS_TO_OURS[arch]
    assert ours.cfg.apply_b_dec_to_input is apply_b_dec
    assert ours.cfg.dtype == dtype
    assert ours.cfg.metadata.get("sae_lens_version")  # SAELens metadata is kept
    assert_same(ours, ref.encode, ref.decode, ref.forward, data(dtype), dtype)


@pytest.mark.parametrize("arch", ["topk", "abstopk"])
def test_saelens_rescale_acts_by_decoder_norm_is_folded(saelens, tmp_path, arch):
    ref = saelens_sae(saelens, arch, "float64", rescale_acts_by_decoder_norm=True)
    with torch.no_grad():  # decoder rows far from unit norm, so the rescaling matters
        ref.W_dec.mul_(torch.linspace(0.2, 3.0, D_SAE, dtype=torch.float64)[:, None])
    ref.save_model(tmp_path / "sae")
    ours = load(tmp_path / "sae")
    assert_same(ours, ref.encode, ref.decode, ref.forward, data("float64"), "float64")
    torch.testing.assert_close(ours.W_dec.norm(dim=1), torch.ones(D_SAE, dtype=torch.float64))


def test_saelens_default_apply_b_dec_is_true(saelens, tmp_path):
    """A cfg.json without apply_b_dec_to_input means True, as SAELens reads it."""
    ref = saelens_sae(saelens, "standard", "float32", apply_b_dec_to_input=True)
    ref.save_model(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    del cfg["apply_b_dec_to_input"]
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    assert load(tmp_path / "sae").cfg.apply_b_dec_to_input is True
    assert_same(load(tmp_path / "sae"), ref.encode, ref.decode, ref.forward, data("float32"), "float32")


def test_saelens_negative_jumprelu_threshold_matches(saelens, tmp_path):
    """SAELens computes relu(u) * [u > t]; with t < 0 that is u * [u > 0], which the clamp on load gives."""
    ref = saelens_sae(saelens, "jumprelu", "float64")
    with torch.no_grad():
        ref.threshold.sub_(0.4)
    assert bool((ref.threshold < 0).any())
    ref.save_model(tmp_path / "sae")
    ours = load(tmp_path / "sae")
    assert_same(ours, ref.encode, ref.decode, ref.forward, data("float64"), "float64")


@pytest.mark.parametrize("cls_name", ["BatchTopKTrainingSAE", "MatryoshkaBatchTopKTrainingSAE"])
def test_saelens_batchtopk_checkpoint_loads_as_its_inference_jumprelu(saelens, tmp_path, cls_name):
    cls = getattr(saelens, cls_name)
    cfg_cls = getattr(saelens, cls_name + "Config")
    kw = {"matryoshka_widths": [8, D_SAE]} if "Matryoshka" in cls_name else {}
    train = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, k=3, rescale_acts_by_decoder_norm=True, dtype="float64", **kw))
    randomise(train, 3)
    with torch.no_grad():
        train.W_dec.mul_(torch.linspace(0.5, 2.0, D_SAE, dtype=torch.float64)[:, None])
        train.topk_threshold.fill_(0.3)
    train.save_model(tmp_path / "ckpt")
    train.save_inference_model(tmp_path / "inference")
    ref = saelens.SAE.load_from_disk(tmp_path / "inference")
    assert ref.cfg.architecture() == "jumprelu"
    for folder in ("ckpt", "inference"):
        ours = load(tmp_path / folder)
        assert ours.architecture == "jumprelu"
        assert_same(ours, ref.encode, ref.decode, ref.forward, data("float64"), "float64")


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
    assert_same(ours, ref.encode, ref.decode, ref.forward, data("float64"), "float64")


def test_saelens_layer_norm_is_refused(saelens, tmp_path):
    ref = saelens_sae(saelens, "standard", "float32", normalize_activations="layer_norm")
    ref.save_model(tmp_path / "sae")
    with pytest.raises(sp.errors.ConfigError, match="layer_norm"):
        load(tmp_path / "sae")


# ------------------------------------------------------------------------------------ splinterp -> SAELens
def our_sae(arch: str, dtype: str, seed: int = 0, **kw) -> sp.SAE:
    sae = sp.SAE(sp.SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=arch, k=K if "topk" in arch else None,
                              dtype=dtype, seed=seed, **kw))
    randomise(sae, seed + 11)
    return sae


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("arch", ["relu", "topk", "topk_abs", "jumprelu", "gated"])
def test_our_folder_loads_in_saelens_with_equal_outputs(saelens, tmp_path, arch, apply_b_dec, dtype, tied):
    ours = our_sae(arch, dtype, apply_b_dec_to_input=apply_b_dec, tied=tied, metadata={"hook_name": "blocks.3"})
    sp.save(ours, tmp_path / "sae")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = saelens.SAE.load_from_disk(tmp_path / "sae")
    assert ref.cfg.architecture() == {"relu": "standard", "topk_abs": "abstopk"}.get(arch, arch)
    assert ref.cfg.apply_b_dec_to_input is apply_b_dec
    assert ref.cfg.metadata.hook_name == "blocks.3"  # read as a SAELens 6 config, metadata kept
    assert_same(ours, ref.encode, ref.decode, ref.forward, data(dtype), dtype)


def test_saelens_resave_of_our_folder_loads_back(saelens, tmp_path):
    """SAELens re-saving our folder drops our block; it still loads, as the same SAE."""
    ours = our_sae("topk", "float32", apply_b_dec_to_input=True)
    sp.save(ours, tmp_path / "a")
    saelens.SAE.load_from_disk(tmp_path / "a").save_model(tmp_path / "b")
    back = load(tmp_path / "b")
    for name, t in sp.io.state_tensors(ours).items():
        assert torch.equal(getattr(back, name), t)


# ------------------------------------------------------------------------------------ sparsify
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

    def decode(z):
        acts, idx = z.topk(K, dim=-1)  # the non-zeros of a TopK code (k per row; zeros decode to nothing)
        return sae.decode(acts, idx)

    return dense, decode, lambda x: sae(x).sae_out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg_kw", [{}, {"num_latents": 0, "expansion_factor": 4}])
def test_sparsify_folder_loads_with_equal_outputs(sparsify, tmp_path, dtype, cfg_kw):
    ref = sparsify_sae(sparsify, dtype, **cfg_kw)
    ref.save_to_disk(tmp_path / "layers.3")
    ours = load(tmp_path / "layers.3")
    assert (ours.architecture, ours.k, ours.cfg.apply_b_dec_to_input) == ("topk", K, True)
    assert ours.cfg.d_sae == ref.num_latents and ours.dtype == dtype
    name = str(dtype).removeprefix("torch.")
    encode, decode, forward = _sparsify_fns(ref)
    with torch.no_grad():
        x = data(name)
        z = encode(x)
        torch.testing.assert_close(ours.encode(x), z, **TOL[name])
        torch.testing.assert_close(ours.decode(z), decode(z), **TOL[name])
        torch.testing.assert_close(ours(x), forward(x), **TOL[name])


@pytest.mark.parametrize("b_dec_in", [True, False])
def test_our_sparsify_export_loads_in_sparsify_with_equal_outputs(sparsify, tmp_path, b_dec_in):
    ours = sp.make_sae(D_IN, D_SAE, "topk", K, apply_b_dec_to_input=b_dec_in, dtype="float64")
    randomise(ours, 3)
    sp.save(ours, tmp_path / "sae", format="sparsify")
    ref = sparsify.SparseCoder.load_from_disk(tmp_path / "sae")
    assert ref.num_latents == D_SAE and ref.cfg.k == K and ref.dtype == torch.float64
    encode, decode, forward = _sparsify_fns(ref)
    with torch.no_grad():
        x = data("float64")
        torch.testing.assert_close(encode(x), ours.encode(x), **TOL["float64"])
        torch.testing.assert_close(forward(x), ours(x), **TOL["float64"])


def test_sparsify_load_many_is_naturally_sorted(sparsify, tmp_path):
    for i in (10, 2, 1):
        sparsify_sae(sparsify, torch.float32, seed=i).save_to_disk(tmp_path / f"layers.{i}")
    saes = sp.io.load_many(tmp_path)
    assert list(saes) == ["layers.1", "layers.2", "layers.10"]
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
