"""save/load: bit-exact round trips, every reader (SAELens, sparsify, dictionary_learning, Gemma Scope) without the
libraries, written from their documented formats, and every bad folder or file."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from strategies import apply_mutation, folder_mutations, randomise, saes

import splinterp as sp
from splinterp.errors import (
    ChecksumError,
    ConfigError,
    CorruptFileError,
    NonFiniteError,
    NotAnSAEFolderError,
    OverwriteError,
    SplinterpError,
)
from splinterp.io import CFG_FILE, WEIGHTS_FILE, detect_format, load, load_many, save, state_tensors

ARCHS = ["relu", "topk", "topk_abs", "jumprelu", "gated"]


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so -0.0 != 0.0 and NaN payloads count)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.detach().cpu().flatten().view(torch.uint8), b.detach().cpu().flatten().view(torch.uint8))


def assert_bit_exact(a: sp.SAE, b: sp.SAE) -> None:
    assert b.cfg == a.cfg.replace(device=b.cfg.device)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert bits_equal(sa[name], sb[name]), name


def make(arch="topk", dtype="float32", tied=False, seed=0, **kw) -> sp.SAE:
    cfg = sp.SAEConfig(d_in=5, d_sae=12, architecture=arch, k=3 if "topk" in arch else None, dtype=dtype, tied=tied,
                       seed=seed, **kw)
    return randomise(sp.SAE(cfg), seed + 1)


def edit_cfg(folder: Path, fn) -> None:
    d = json.loads((folder / CFG_FILE).read_text())
    fn(d)
    (folder / CFG_FILE).write_text(json.dumps(d))


# ------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_is_bit_exact_for_every_combination(tmp_path, arch, dtype, tied):
    sae = make(arch, dtype, tied, metadata={"hook_name": "h", "layers": [1, 2]})
    save(sae, tmp_path / "sae")
    back = load(tmp_path / "sae")
    assert_bit_exact(sae, back)
    assert detect_format(tmp_path / "sae") == "splinterp"
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == [CFG_FILE, WEIGHTS_FILE]


@settings(max_examples=25, deadline=None)
@given(sae=saes())
def test_round_trip_property(sae):
    with tempfile.TemporaryDirectory() as d:
        save(sae, Path(d) / "sae")
        assert_bit_exact(sae, load(Path(d) / "sae"))


@settings(max_examples=25, deadline=None)
@given(sae=saes(dtypes=("float32", "float64")))
def test_stripping_our_block_reads_the_same_sae_through_the_saelens_keys(sae):
    """The SAELens keys alone describe the same function: our SAELens reader agrees with our own."""
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "sae"
        save(sae, folder)
        edit_cfg(folder, lambda c: (c.pop("splinterp"), c.pop("splinterp_checksum")))
        assert detect_format(folder) == "saelens"
        back = load(folder)
        for name, t in state_tensors(sae).items():
            assert bits_equal(getattr(back, name), t), name
        x = torch.randn(7, sae.cfg.d_in, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(sae.dtype)
        with torch.no_grad():  # bit-equal weights; a tied decoder multiplies by a transposed view, so allclose
            torch.testing.assert_close(back(x), sae(x))


def test_save_overwrites_an_sae_folder_atomically(tmp_path):
    save(make(seed=1), tmp_path / "sae")
    second = make(seed=2)
    save(second, tmp_path / "sae")
    assert_bit_exact(second, load(tmp_path / "sae"))
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]  # no temporaries left


def test_load_moves_to_device_and_returns_a_working_sae(tmp_path):
    save(make(), tmp_path / "sae")
    sae = load(tmp_path / "sae", device="cpu")
    assert sae.device == torch.device("cpu")
    assert sae.encode(torch.randn(3, 5)).shape == (3, 12)


def test_load_many_sorts_naturally(tmp_path):
    for i in (10, 9, 1):
        save(make(seed=i), tmp_path / f"layer_{i}")
    (tmp_path / "notes").mkdir()
    assert list(load_many(tmp_path)) == ["layer_1", "layer_9", "layer_10"]
    with pytest.raises(NotAnSAEFolderError, match="load_many"):
        load(tmp_path)
    with pytest.raises(NotAnSAEFolderError):
        load_many(tmp_path / "notes")


# ------------------------------------------------------------------------------------ foreign formats, no library
def write_sparsify(folder: Path, dtype=torch.float32, **cfg) -> dict[str, torch.Tensor]:
    """A sparsify folder (d_in 5, 12 latents, k 3) as SparseCoder.save_to_disk writes it; `cfg` edits cfg.json."""
    d_in, d_sae = 5, 12
    g = torch.Generator().manual_seed(0)
    t = {"encoder.weight": torch.randn(d_sae, d_in, generator=g), "encoder.bias": torch.randn(d_sae, generator=g),
         "W_dec": torch.randn(d_sae, d_in, generator=g), "b_dec": torch.randn(d_in, generator=g)}
    t = {n: v.to(dtype) for n, v in t.items()}
    folder.mkdir(parents=True)
    save_file(t, str(folder / "sae.safetensors"))
    base = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": d_sae, "k": 3,
            "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": d_in}
    (folder / CFG_FILE).write_text(json.dumps({**base, **cfg}))
    return t


def test_sparsify_folder_encodes_like_sparsify(tmp_path):
    t = write_sparsify(tmp_path / "layers.0")
    sae = load(tmp_path / "layers.0")
    assert detect_format(tmp_path / "layers.0") == "sparsify"
    x = torch.randn(9, 5)
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    vals, idx = pre.topk(3)
    z = torch.zeros_like(pre).scatter_(-1, idx, vals)
    torch.testing.assert_close(sae.encode(x), z)
    torch.testing.assert_close(sae(x), z @ t["W_dec"] + t["b_dec"])


@pytest.mark.parametrize(
    ("cfg", "error", "match"),
    [
        ({"transcode": True}, ConfigError, "transcoder"),
        ({"skip_connection": True}, ConfigError, "skip"),
        ({"activation": "groupmax"}, ConfigError, "groupmax"),
        ({"k": 13}, ConfigError, "k must be"),
        ({"k": 0}, ConfigError, "k must be"),
        ({"k": "3"}, ConfigError, "'k' must be int"),
        ({"d_in": 4}, CorruptFileError, "d_in=4"),
        ({"num_latents": 7}, CorruptFileError, "implies 7"),
        ({"num_latents": 0, "expansion_factor": 3}, CorruptFileError, "implies 15"),
    ],
)
def test_bad_sparsify_folders(tmp_path, cfg, error, match):
    write_sparsify(tmp_path / "s", **cfg)
    with pytest.raises(error, match=match):
        load(tmp_path / "s")


def test_sparsify_folder_without_k_or_decoder(tmp_path):
    write_sparsify(tmp_path / "a")
    edit_cfg(tmp_path / "a", lambda c: c.pop("k"))
    with pytest.raises(CorruptFileError, match="'k'"):
        load(tmp_path / "a")
    t = write_sparsify(tmp_path / "b")
    del t["W_dec"]
    save_file(t, str(tmp_path / "b" / "sae.safetensors"))
    with pytest.raises(CorruptFileError, match="W_dec"):
        load(tmp_path / "b")


def saelens_folder(folder: Path, sae: sp.SAE, **cfg_changes) -> None:
    """A folder as SAELens 6 writes it (no splinterp block)."""
    save(sae, folder)
    edit_cfg(folder, lambda c: (c.pop("splinterp"), c.pop("splinterp_checksum"), c.update(cfg_changes)))


def test_saelens_reader_conventions(tmp_path):
    sae = make("topk", apply_b_dec_to_input=True)
    saelens_folder(tmp_path / "a", sae, dtype="torch.float32")
    assert load(tmp_path / "a").cfg.dtype == "float32"
    # a cfg without apply_b_dec_to_input means True (the SAELens default)
    saelens_folder(tmp_path / "b", sae)
    edit_cfg(tmp_path / "b", lambda c: c.pop("apply_b_dec_to_input"))
    assert load(tmp_path / "b").cfg.apply_b_dec_to_input is True
    # SAELens < 6 wrote TopK as standard + activation_fn_kwargs
    saelens_folder(tmp_path / "c", sae, architecture="standard", activation_fn="topk", activation_fn_kwargs={"k": 3})
    edit_cfg(tmp_path / "c", lambda c: c.pop("k"))
    assert (load(tmp_path / "c").architecture, load(tmp_path / "c").k) == ("topk", 3)
    # the legacy name splinterp 0.1.0 wrote for topk_abs still reads
    saelens_folder(tmp_path / "d", make("topk_abs"), architecture="topk_abs")
    assert load(tmp_path / "d").architecture == "topk_abs"


def test_saelens_fold_of_rescale_acts_by_decoder_norm(tmp_path):
    sae = make("topk", dtype="float64", apply_b_dec_to_input=True)
    saelens_folder(tmp_path / "a", sae, rescale_acts_by_decoder_norm=True)
    ours = load(tmp_path / "a")
    x = torch.randn(20, 5, dtype=torch.float64)
    n = sae.W_dec.norm(dim=1)
    with torch.no_grad():  # SAELens: scores u * n, then top-k + relu, decode (z / n) @ W_dec + b_dec
        u = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        s = u * n
        vals, idx = s.topk(3)
        z = torch.zeros_like(s).scatter_(-1, idx, vals.relu())
        torch.testing.assert_close(ours.encode(x), z)
        torch.testing.assert_close(ours(x), (z / n) @ sae.W_dec + sae.b_dec)


def test_saelens_activation_scaler_is_folded(tmp_path):
    sae = make("relu", dtype="float64", apply_b_dec_to_input=True)
    saelens_folder(tmp_path / "a", sae, normalize_activations="expected_average_only_in")
    (tmp_path / "a" / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 4.0}))
    ours = load(tmp_path / "a")
    x = torch.randn(6, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), sae.encode(4 * x))
        torch.testing.assert_close(ours(x), sae(4 * x) / 4)
    (tmp_path / "a" / "activation_scaler.json").write_text(json.dumps({"scaling_factor": -1}))
    with pytest.raises(CorruptFileError, match="positive"):
        load(tmp_path / "a")


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"architecture": "matching_pursuit"}, ConfigError, "not supported"),
        ({"architecture": 3}, ConfigError, "'architecture' must be str"),
        ({"normalize_activations": "layer_norm"}, ConfigError, "non-affine"),
        ({"normalize_activations": "constant_norm_rescale"}, ConfigError, "non-affine"),
        ({"dtype": "float8"}, ConfigError, "dtype"),
        ({"d_in": "5"}, ConfigError, "'d_in' must be int"),
        ({"d_in": 6}, CorruptFileError, "implies"),
        ({"d_sae": 10**12}, ConfigError, "d_sae=1000000000000.*needs about"),  # refused before the shape check
        ({"k": 99}, ConfigError, "k must be"),
        ({"k": None}, CorruptFileError, "lacks the field 'k'"),
        ({"metadata": [1]}, ConfigError, "'metadata' must be dict"),
        ({"activation_fn": "tanh-relu", "architecture": "standard"}, ConfigError, "activation_fn"),
        ({"finetuning_scaling_factor": True}, ConfigError, "finetuning"),
    ],
)
def test_bad_saelens_cfgs(tmp_path, changes, error, match):
    saelens_folder(tmp_path / "a", make("topk"), **changes)
    with pytest.raises(error, match=match):
        load(tmp_path / "a")


def test_saelens_unknown_keys_are_ignored(tmp_path):
    """SAELens training configs carry dozens of keys that do not change inference."""
    sae = make("relu")
    saelens_folder(tmp_path / "a", sae, l1_coefficient=5.0, lp_norm=1.0, some_future_key=[1, 2])
    assert torch.equal(load(tmp_path / "a").W_enc, sae.W_enc)


def test_saelens_weights_problems(tmp_path):
    saelens_folder(tmp_path / "a", make("jumprelu"))
    t = load_file(str(tmp_path / "a" / WEIGHTS_FILE))
    save_file({**t, "threshold": torch.full((12,), float("nan"))}, str(tmp_path / "a" / WEIGHTS_FILE))
    with pytest.raises(CorruptFileError, match=r"threshold contains a non-finite value \(nan\) at index 0"):
        load(tmp_path / "a")
    save_file({**t, "extra": torch.zeros(2)}, str(tmp_path / "a" / WEIGHTS_FILE))
    with pytest.raises(CorruptFileError, match="unexpected weights"):
        load(tmp_path / "a")
    save_file({**t, "W_enc": t["W_enc"].to(torch.int32)}, str(tmp_path / "a" / WEIGHTS_FILE))
    with pytest.raises(CorruptFileError, match="floating point"):
        load(tmp_path / "a")
    save_file({**t, "scaling_factor": torch.ones(12)}, str(tmp_path / "a" / WEIGHTS_FILE))
    load(tmp_path / "a")  # an all-ones scaling factor is dropped, as SAELens does
    save_file({**t, "scaling_factor": torch.full((12,), 2.0)}, str(tmp_path / "a" / WEIGHTS_FILE))
    with pytest.raises(ConfigError, match="scaling_factor"):
        load(tmp_path / "a")


# ------------------------------------------------------------------------------------ bad folders: our format
def test_not_an_sae_folder(tmp_path):
    with pytest.raises(NotAnSAEFolderError, match="not a folder"):
        load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotAnSAEFolderError, match="no cfg.json"):
        load(tmp_path / "empty")
    save(make(), tmp_path / "sae")
    with pytest.raises(NotAnSAEFolderError, match="pass the folder"):
        load(tmp_path / "sae" / CFG_FILE)
    (tmp_path / "sae" / WEIGHTS_FILE).unlink()
    with pytest.raises(NotAnSAEFolderError, match="neither"):
        load(tmp_path / "sae")
    assert issubclass(NotAnSAEFolderError, FileNotFoundError)


@pytest.mark.parametrize("keep", [0.0, 0.01, 0.5, 0.99])
def test_truncated_weights(tmp_path, keep):
    save(make(), tmp_path / "sae")
    w = tmp_path / "sae" / WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[: int(w.stat().st_size * keep)])
    with pytest.raises(CorruptFileError):
        load(tmp_path / "sae")
    with pytest.raises(CorruptFileError, match="truncated or corrupt"):
        load(tmp_path / "sae", verify=False)


def test_flipped_weight_byte_is_a_checksum_error(tmp_path):
    save(make(), tmp_path / "sae")
    w = tmp_path / "sae" / WEIGHTS_FILE
    data = bytearray(w.read_bytes())
    data[-3] ^= 0x01  # inside the tensor data: still a valid safetensors file
    w.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="checksum"):
        load(tmp_path / "sae")
    assert load(tmp_path / "sae", verify=False).cfg.d_in == 5  # the escape hatch the message names


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", "null", "\xff\xfe"])
def test_corrupt_cfg_json(tmp_path, text):
    save(make(), tmp_path / "sae")
    (tmp_path / "sae" / CFG_FILE).write_bytes(text.encode("latin-1"))
    with pytest.raises(CorruptFileError):
        load(tmp_path / "sae")


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (lambda c: c["splinterp"].update(d_in=6), CorruptFileError, "disagrees with itself: d_in"),
        (lambda c: c.update(d_sae=13), CorruptFileError, "disagrees with itself: d_sae"),
        (lambda c: c["splinterp"].update(d_in=6) or c.update(d_in=6), CorruptFileError, "implies"),
        (lambda c: c.update(architecture="standard"), CorruptFileError, "architecture"),
        (lambda c: c.update(normalize_activations="layer_norm"), CorruptFileError, "normalize_activations"),
        (lambda c: c["splinterp"].update(k=0) or c.update(k=0), ConfigError, "k must be"),
        (lambda c: c["splinterp"].update(k=13) or c.update(k=13), ConfigError, "k must be"),
        (lambda c: c["splinterp"].update(colour="red"), ConfigError, "unknown SAEConfig fields"),
        (lambda c: c["splinterp"].update(tied="yes"), ConfigError, "tied must be bool"),
        (lambda c: c["splinterp"].update(seed=1.5), ConfigError, "seed must be int"),
        (lambda c: c["splinterp"].update(metadata="x"), ConfigError, "metadata must be dict"),
        (lambda c: c["splinterp"].update(jumprelu_init_threshold=float("nan")), ConfigError, "finite"),
        (lambda c: c["splinterp"].pop("d_in"), ConfigError, "d_in"),
        (lambda c: c.update(splinterp=[1]), CorruptFileError, "must be an object"),
        (lambda c: c.update(splinterp_checksum={"sae_weights.safetensors": "md5:1"}), CorruptFileError, "malformed"),
        (lambda c: c["splinterp"].update(dtype="float64") or c.update(dtype="float64"), CorruptFileError,
         "stored as torch.float32"),
        (lambda c: c["splinterp"].update(architecture="gated", k=None) or c.update(architecture="gated", k=None),
         CorruptFileError, "missing"),
    ],
)
def test_cfg_disagreeing_with_itself_or_the_weights(tmp_path, edit, error, match):
    save(make("topk"), tmp_path / "sae")
    edit_cfg(tmp_path / "sae", edit)
    with pytest.raises(error, match=match):
        load(tmp_path / "sae")


def test_tied_cfg_with_untied_weights(tmp_path):
    save(make("relu", tied=False), tmp_path / "sae")
    edit_cfg(tmp_path / "sae", lambda c: c["splinterp"].update(tied=True))
    with pytest.raises(CorruptFileError, match="tied"):
        load(tmp_path / "sae")


def test_bad_device(tmp_path):
    save(make(), tmp_path / "sae")
    with pytest.raises(ConfigError, match="device"):
        load(tmp_path / "sae", device="not-a-device")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sae=saes(max_d_in=4, max_d_sae=6), mutation=folder_mutations(), strip_block=st.booleans())
def test_damaged_folders_raise_only_splinterp_errors(sae, mutation, strip_block):
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = Path(d) / "sae"
        save(sae, folder)
        if strip_block:  # exercise the SAELens reader too
            edit_cfg(folder, lambda c: (c.pop("splinterp"), c.pop("splinterp_checksum")))
        apply_mutation(folder, mutation)
        try:
            loaded = load(folder)
        except SplinterpError:
            return
        assert isinstance(loaded, sp.SAE)


@settings(max_examples=25, deadline=None)
@given(sae=saes(max_d_in=4, max_d_sae=6), where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_any_flipped_bit_in_our_weights_is_detected(sae, where, bit):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "sae"
        save(sae, folder)
        w = folder / WEIGHTS_FILE
        data = bytearray(w.read_bytes())
        data[int(len(data) * where)] ^= 1 << bit
        w.write_bytes(bytes(data))
        with pytest.raises(CorruptFileError):  # ChecksumError is one
            load(folder)


# ------------------------------------------------------------------------------------ bad saves
def test_save_refuses_to_clobber(tmp_path):
    sae = make()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OverwriteError, match="not a folder"):
        save(sae, tmp_path / "file")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(OverwriteError, match="not an SAE folder"):
        save(sae, tmp_path / "home")
    save(sae, tmp_path / "sae")
    (tmp_path / "sae" / "notes.md").write_text("mine")
    with pytest.raises(OverwriteError, match="notes.md"):
        save(sae, tmp_path / "sae")
    assert (tmp_path / "home" / "thesis.tex").read_text() == "precious"
    assert (tmp_path / "sae" / "notes.md").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    save(sae, tmp_path / "empty")  # an empty folder is fine
    assert issubclass(OverwriteError, FileExistsError)


def test_save_refuses_non_finite_weights_and_bad_metadata(tmp_path):
    sae = make()
    with torch.no_grad():
        sae.W_enc[2, 4] = float("inf")
    with pytest.raises(NonFiniteError, match="W_enc contains a non-finite value \\(inf\\) at row 2, column 4"):
        save(sae, tmp_path / "a")
    sae = make(metadata={"when": object()})
    with pytest.raises(ConfigError, match="not plain JSON"):
        save(sae, tmp_path / "b")
    sae = make(metadata={"loss": float("nan")})
    with pytest.raises(ConfigError, match="not plain JSON"):
        save(sae, tmp_path / "c")
    with pytest.raises(TypeError, match="splinterp SAE"):
        save(torch.nn.Linear(2, 2), tmp_path / "d")
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_save_warns_on_negative_jumprelu_threshold(tmp_path):
    sae = make("jumprelu")
    with torch.no_grad():
        sae.threshold[0] = -0.1
    with pytest.warns(UserWarning, match="SAELens"):
        save(sae, tmp_path / "a")
    assert bits_equal(load(tmp_path / "a").threshold, sae.threshold)  # our own round trip keeps it


# ------------------------------------------------------------------------------------------ sparsify export
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("b_dec_in", [True, False])
@pytest.mark.parametrize("tied", [False, True])
def test_sparsify_export_reads_back_as_the_same_sae(tmp_path, dtype, b_dec_in, tied):
    """format="sparsify" writes sparsify's folder; read back (sparsify semantics: b_dec applied to the input,
    folded into the encoder bias when the SAE did not apply it) it computes the same codes and outputs."""
    sae = randomise(sp.make_sae(7, 20, "topk", 3, dtype=dtype, tied=tied, apply_b_dec_to_input=b_dec_in), 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what sparsify cannot hold is named (tests/test_interop.py)
        save(sae, tmp_path / "sp", format="sparsify")
    assert detect_format(tmp_path / "sp") == "sparsify"
    cfg = json.loads((tmp_path / "sp" / CFG_FILE).read_text())
    assert (cfg["d_in"], cfg["num_latents"], cfg["k"], cfg["activation"]) == (7, 20, 3, "topk")
    back = load(tmp_path / "sp")
    assert back.cfg.apply_b_dec_to_input and back.dtype == sae.dtype
    x = torch.randn(50, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(sae.dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        if dtype == "float64":  # float32 folding of b_dec may reorder near-ties
            assert torch.equal(back.encode_sparse(x)[1], sae.encode_sparse(x)[1])
        torch.testing.assert_close(back.encode(x), sae.encode(x), **tol)
        torch.testing.assert_close(back(x), sae(x), **tol)


def test_sparsify_export_refuses_what_sparsify_cannot_hold(tmp_path):
    for arch, k in (("topk_abs", 2), ("relu", None), ("jumprelu", None), ("gated", None)):
        with pytest.raises(ConfigError, match="sparsify"):
            save(sp.make_sae(4, 8, arch, k), tmp_path / arch, format="sparsify")
        assert not (tmp_path / arch).exists()
    with pytest.raises(ConfigError, match="format"):
        save(sp.make_sae(4, 8, "topk", 2), tmp_path / "x", format="saelens5")


# ------------------------------------------------------------------------------------ more sources, no library
def test_not_an_sae_lists_every_format(tmp_path):
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(NotAnSAEFolderError) as e:
            load(target)
        for needle in ("cfg.json", "sae_weights.safetensors", "sae.safetensors", "ae.pt", "config.json", "params.npz",
                       "load_many", "sae_id=", "as_sae", "from_weights"):
            assert needle in str(e.value), needle


def test_our_round_trip_keeps_score_order_layout_ties_and_hook_z(tmp_path):
    sae = make("topk", score_order="linear", w_enc_layout="row_major", topk_ties="torch_relu",
               reshape_activations="hook_z", metadata={"hook_name": "blocks.1.attn.hook_z"})
    save(sae, tmp_path / "sae")
    back = load(tmp_path / "sae")
    assert_bit_exact(sae, back)
    assert back.W_enc.is_contiguous()  # the layout comes back too (it changes float16 rounding)
    with pytest.raises(ConfigError, match="_z"):  # SAELens refuses a hook_z SAE whose hook is not a _z hook
        save(make("topk", reshape_activations="hook_z", metadata={"hook_name": "blocks.1.hook_resid_post"}),
             tmp_path / "bad")


def test_load_casts_dtype_and_overrides_k(tmp_path):
    sae = make("topk", dtype="float32")
    save(sae, tmp_path / "sae")
    half = load(tmp_path / "sae", dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and half.cfg.dtype == "bfloat16"
    assert torch.equal(half.W_enc, sae.W_enc.detach().to(torch.bfloat16))
    assert load(tmp_path / "sae", k=5).k == 5 and load(tmp_path / "sae", k=5).cfg.metadata["k_saved"] == 3
    with pytest.raises(ConfigError, match="k must be"):
        load(tmp_path / "sae", k=13)
    save(make("relu"), tmp_path / "relu")
    with pytest.raises(ConfigError, match="TopK SAEs only"):
        load(tmp_path / "relu", k=2)
    with pytest.raises(ConfigError, match="dtype"):
        load(tmp_path / "sae", dtype="int8")


def test_as_sae_refuses_what_it_cannot_convert():
    sae = make()
    assert sp.as_sae(sae) is sae
    with pytest.raises(sp.errors.UnsupportedObjectError, match="SAELens"):
        sp.as_sae(torch.nn.Linear(3, 4))
    assert issubclass(sp.errors.UnsupportedObjectError, TypeError)


def test_saelens_pre_6_config_without_the_library(tmp_path):
    """SAELens < 6 kept hook_point / model_name at the top: they become metadata; a hook_z hook means hook_z."""
    sae = make("relu", apply_b_dec_to_input=True)
    saelens_folder(tmp_path / "a", sae)
    edit_cfg(tmp_path / "a", lambda c: (c.pop("metadata"), c.pop("reshape_activations"),
                                         c.update(hook_point="blocks.1.attn.hook_z", model_name="gpt2-small",
                                                  hook_point_head_index=None, sae_lens_training_version="2.1.3")))
    back = load(tmp_path / "a")
    assert back.cfg.metadata["hook_name"] == "blocks.1.attn.hook_z" and back.cfg.metadata["model_name"] == "gpt2-small"
    assert back.cfg.reshape_activations == "hook_z"
    assert bits_equal(back.W_enc, sae.W_enc)


def write_gemma_scope(path: Path, **changes) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {"W_enc": torch.randn(5, 12, generator=g), "W_dec": torch.randn(12, 5, generator=g),
         "b_enc": torch.randn(12, generator=g), "b_dec": torch.randn(5, generator=g),
         "threshold": torch.rand(12, generator=g)}
    arrays = {n: v.numpy() for n, v in t.items()}
    arrays.update(changes)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{n: a for n, a in arrays.items() if a is not None})
    return t


def test_gemma_scope_npz_is_a_jumprelu_on_raw_inputs(tmp_path):
    t = write_gemma_scope(tmp_path / "params.npz")
    sae = load(tmp_path / "params.npz")
    assert detect_format(tmp_path) == detect_format(tmp_path / "params.npz") == "gemma_scope"
    assert (sae.architecture, sae.cfg.apply_b_dec_to_input, sae.cfg.dtype) == ("jumprelu", False, "float32")
    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(1))
    u = x @ t["W_enc"] + t["b_enc"]  # Gemma Scope's JumpReLU, written out
    z = torch.relu(u) * (u > t["threshold"])
    assert torch.equal(sae.encode(x), z)
    torch.testing.assert_close(sae(x), z @ t["W_dec"] + t["b_dec"])


def test_gemma_scope_path_gives_model_and_hook(tmp_path):
    snap = tmp_path / "models--google--gemma-scope-2b-pt-att" / "snapshots" / ("0" * 40)
    write_gemma_scope(snap / "layer_7" / "width_16k" / "average_l0_50" / "params.npz")
    meta = load(snap / "layer_7" / "width_16k" / "average_l0_50").cfg
    assert meta.metadata["model_name"] == "gemma-2-2b" and meta.metadata["hook_name"] == "blocks.7.attn.hook_z"
    assert meta.metadata["sae_id"] == "layer_7/width_16k/average_l0_50" and meta.reshape_activations == "hook_z"


def test_bad_gemma_scope_files(tmp_path):
    write_gemma_scope(tmp_path / "a" / "params.npz", w_enc=np.zeros((5, 12), np.float32), W_enc=None)
    assert load(tmp_path / "a").cfg.d_sae == 12  # w_* keys are read as W_*, as SAELens does
    write_gemma_scope(tmp_path / "b" / "params.npz", threshold=None)
    with pytest.raises(CorruptFileError, match="threshold"):
        load(tmp_path / "b")
    write_gemma_scope(tmp_path / "c" / "params.npz", threshold=np.array([object()] * 12, dtype=object))
    with pytest.raises(CorruptFileError, match="pickled"):  # never unpickled
        load(tmp_path / "c")
    write_gemma_scope(tmp_path / "d" / "params.npz", scaling_factor=np.full(12, 2.0, np.float32))
    with pytest.raises(ConfigError, match="scaling_factor"):
        load(tmp_path / "d")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "params.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CorruptFileError):
        load(tmp_path / "e")


class _Payload:
    """A pickled object: `torch.load(weights_only=True)` must refuse to build it."""


def test_dictionary_learning_folder_with_code_in_ae_pt_is_refused(tmp_path):
    folder = tmp_path / "trainer_0"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    torch.save({"encoder.weight": torch.zeros(4, 2), "payload": _Payload()}, folder / "ae.pt")
    assert detect_format(folder) == "dictionary_learning"
    with pytest.raises(CorruptFileError, match="weights-only"):
        load(folder)
    (folder / "config.json").unlink()
    with pytest.raises(NotAnSAEFolderError, match="config.json"):
        load(folder)


def test_dictionary_learning_folder_without_the_library(tmp_path):
    """An AutoEncoder run folder, written from the format: its loader normalises decoder columns (folding the norms
    into the encoder), and it encodes relu(encoder(x - bias)) through nn.Linear."""
    g = torch.Generator().manual_seed(0)
    sd = {"bias": torch.randn(5, generator=g), "encoder.weight": torch.randn(12, 5, generator=g),
          "encoder.bias": torch.randn(12, generator=g), "decoder.weight": torch.randn(5, 12, generator=g) * 3}
    folder = tmp_path / "trainer_0"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder", "lm_name": "m",
                                                                "layer": 2}}))
    torch.save(sd, folder / "ae.pt")
    sae = load(folder)
    assert (sae.architecture, sae.cfg.score_order, sae.cfg.metadata["model_name"]) == ("relu", "linear", "m")
    n = sd["decoder.weight"].norm(dim=0)
    x = torch.randn(20, 5, generator=g)
    z = torch.relu(torch.nn.functional.linear(x - sd["bias"], sd["encoder.weight"] * n[:, None],
                                              sd["encoder.bias"] * n))
    torch.testing.assert_close(sae.encode(x), z)
    torch.testing.assert_close(sae(x), z @ (sd["decoder.weight"] / n).T + sd["bias"])
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(12))
