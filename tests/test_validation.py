"""Bad input to every public entry point that exists gets a specific SplinterpError naming the problem."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from typing import Literal

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import non_finite_data, randomise, sae_configs

import splinterp as sp
from splinterp.errors import (
    ConfigError,
    DeviceError,
    DTypeError,
    EmptyDataError,
    NonFiniteError,
    ShapeError,
    SplinterpError,
    TooLargeError,
)
from splinterp.validation import (
    _type_hints,
    check_batch,
    check_data,
    check_dataclass_types,
    check_finite,
    check_mask,
    check_positive_int,
)

ARCHS = ["relu", "topk", "topk_abs", "jumprelu", "gated"]


def make(arch: str, dtype: str = "float32") -> sp.SAE:
    return randomise(sp.SAE(sp.SAEConfig(d_in=5, d_sae=12, architecture=arch, k=3 if "topk" in arch else None,
                                         dtype=dtype)), 0)


# ------------------------------------------------------------------------------------ check_data
def test_check_data_errors():
    x = torch.randn(4, 3)
    assert check_data(x, 3) is x
    assert isinstance(check_data(np.zeros((2, 3), np.float32), 3), torch.Tensor)  # numpy wrapped, no copy
    with pytest.raises(DTypeError, match="torch.Tensor or numpy.ndarray"):
        check_data([[1.0, 2.0]])
    with pytest.raises(ShapeError, match="2-D"):
        check_data(torch.randn(3))
    with pytest.raises(ShapeError, match="2-D"):
        check_data(torch.randn(2, 3, 4))
    with pytest.raises(EmptyDataError, match="no rows"):
        check_data(torch.zeros(0, 3))
    assert check_data(torch.zeros(0, 3), allow_empty=True).shape == (0, 3)
    with pytest.raises(ShapeError, match="3 columns but the model expects d_in=4"):
        check_data(x, 4)
    with pytest.raises(DTypeError, match="floating dtype"):
        check_data(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(DTypeError, match="convert explicitly"):
        check_data(x.double(), dtype=torch.float32)
    with pytest.raises(DeviceError, match="meta"):
        check_data(x, device="meta")


@settings(max_examples=25, deadline=None)
@given(case=non_finite_data(d_in=4))
def test_check_data_names_the_first_bad_row(case):
    x, row = case
    with pytest.raises(NonFiniteError, match=rf"at row {row}, column"):
        check_data(x, 4)


def test_check_finite_indices():
    with pytest.raises(NonFiniteError, match=r"index 2"):
        check_finite(torch.tensor([0.0, 1.0, math.nan]))
    t = torch.zeros(2, 2, 2)
    t[1, 0, 1] = math.inf
    with pytest.raises(NonFiniteError, match=r"index \(1, 0, 1\)"):
        check_finite(t)


def test_check_batch():
    assert check_batch(torch.zeros(2, 3, 4), 4).shape == (2, 3, 4)
    assert check_batch(torch.zeros(0, 4), 4).shape == (0, 4)  # an empty batch is a valid batch
    with pytest.raises(DTypeError, match="numpy"):
        check_batch(np.zeros((2, 4)), 4)
    with pytest.raises(DTypeError, match="torch.Tensor"):
        check_batch([0.0] * 4, 4)
    with pytest.raises(ShapeError, match=r"\[\.\.\., d_sae=4\], got \(2, 3\)"):
        check_batch(torch.zeros(2, 3), 4, dim_name="d_sae")
    with pytest.raises(ShapeError):
        check_batch(torch.tensor(1.0), 1)
    with pytest.raises(DTypeError):
        check_batch(torch.zeros(2, 4, dtype=torch.int32), 4)
    with pytest.raises(DTypeError, match="convert explicitly"):
        check_batch(torch.zeros(2, 4), 4, dtype=torch.float64)
    x = torch.zeros(2, 3, 4)
    x[1, 1, 2] = math.nan
    with pytest.raises(NonFiniteError, match=r"row 4, column 2 \(index \(1, 1, 2\)\)"):
        check_batch(x, 4)


def test_small_checks():
    assert check_positive_int(np.int64(3), "n") == 3
    for bad in (0, -1, True, 2.0, "3", None):
        with pytest.raises(ConfigError, match="positive integer"):
            check_positive_int(bad, "n")
    assert check_mask(torch.zeros(3, 5, dtype=torch.bool), 5).shape == (3, 5)
    with pytest.raises(DTypeError):
        check_mask(torch.zeros(5), 5)
    with pytest.raises(ShapeError):
        check_mask(torch.zeros(1, 1, 5, dtype=torch.bool), 5)


@dataclasses.dataclass
class _Cfg:
    n: int
    lr: float = 0.1
    flag: bool = False
    name: str | None = None
    mode: str = "a"
    tags: list[int] = dataclasses.field(default_factory=list)


@pytest.mark.parametrize(
    ("changes", "match"),
    [({"n": 1.5}, "n must be int"), ({"n": True}, "n must be int"), ({"lr": "0.1"}, "lr must be float"),
     ({"lr": math.nan}, "finite"), ({"lr": math.inf}, "finite"), ({"flag": 1}, "flag must be bool"),
     ({"name": 3}, "name must be"), ({"tags": (1,)}, "tags must be list")],
)
def test_check_dataclass_types(changes, match):
    check_dataclass_types(_Cfg(n=1, lr=1, name=None))  # an int is a fine float
    with pytest.raises(ConfigError, match=match):
        check_dataclass_types(dataclasses.replace(_Cfg(n=1), **changes))


@dataclasses.dataclass
class _Unresolvable:
    n: int
    rng: NotImportedHere  # noqa: F821 (what a name imported only under TYPE_CHECKING looks like at run time)


def test_unresolvable_annotations_fail_loudly_instead_of_switching_the_check_off():
    """The check used to return silently, so a config with one bad annotation had none of its fields checked."""
    with pytest.raises(TypeError, match=r"annotations of .*_Unresolvable do not resolve .*NotImportedHere"):
        check_dataclass_types(_Unresolvable(n="not an int", rng=None))


def test_every_config_dataclass_of_the_package_resolves():
    """Every dataclass in splinterp can be type-checked (none would hit the error above)."""
    import importlib
    import inspect
    import pkgutil

    found = 0
    for m in pkgutil.walk_packages(sp.__path__, "splinterp."):
        if m.name.endswith("__main__"):
            continue
        mod = importlib.import_module(m.name)
        for obj in vars(mod).values():
            if inspect.isclass(obj) and dataclasses.is_dataclass(obj) and obj.__module__ == mod.__name__:
                assert _type_hints(obj).keys() >= {f.name for f in dataclasses.fields(obj)}, obj
                found += 1
    assert found >= 30


# A value of the wrong type for each kind of annotation (written by hand, not derived from the checker).
_WRONG = {"d_in": "5", "d_sae": 2.0, "architecture": "softmax", "k": 1.5, "tied": "yes",
          "apply_b_dec_to_input": 1, "seed": 0.5, "dtype": "float8", "device": 3, "jumprelu_init_threshold": "x",
          "metadata": [], "score_order": "both", "w_enc_layout": 0, "topk_ties": None, "reshape_activations": 2}


@settings(max_examples=25, deadline=None)
@given(cfg=sae_configs(), field=st.sampled_from(sorted(_WRONG)))
def test_the_type_check_passes_valid_configs_and_refuses_one_wrong_field(cfg, field):
    """Every valid generated config passes; the same config with one field set to a value of the wrong
    type (as a JSON file could hold it) is refused with an error naming that field."""
    check_dataclass_types(cfg)
    bad = dataclasses.replace(cfg)  # a copy whose field is then set without running __post_init__
    object.__setattr__(bad, field, _WRONG[field])
    with pytest.raises(ConfigError, match=field):
        check_dataclass_types(bad)


def test_the_wrong_values_cover_every_field():
    assert set(_WRONG) == {f.name for f in dataclasses.fields(sp.SAEConfig)}


# ------------------------------------------------------------------------------------ SAEConfig
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"d_in": 0}, "d_in must be a positive integer"),
        ({"d_in": -3}, "d_in"),
        ({"d_in": True}, "d_in"),
        ({"d_in": "5"}, "d_in"),
        ({"d_sae": 2.0}, "d_sae"),
        ({"architecture": "softmax"}, "architecture must be one of"),
        ({"architecture": "topk", "k": None}, "needs k"),
        ({"architecture": "topk", "k": 13}, r"1 <= k <= d_sae=12"),
        ({"architecture": "topk_abs", "k": 0}, r"1 <= k <= d_sae=12"),
        ({"architecture": "topk", "k": -1}, "k must be"),
        ({"architecture": "topk", "k": 2.0}, "k must be"),
        ({"architecture": "relu", "k": 3}, "does not use k"),
        ({"dtype": "float8"}, "dtype must be one of"),
        ({"dtype": torch.float32}, "dtype must be one of"),
        ({"device": "gpu0"}, "not a valid torch device"),
    ],
)
def test_sae_config_errors(kw, match):
    base = {"d_in": 5, "d_sae": 12, "architecture": "relu"}
    with pytest.raises(ConfigError, match=match):
        sp.SAEConfig(**{**base, **kw})


def test_sae_config_from_dict_unknown_fields():
    d = sp.SAEConfig(d_in=5, d_sae=12, architecture="relu").to_dict()
    assert sp.SAEConfig.from_dict(d).d_in == 5
    with pytest.raises(ConfigError, match=r"unknown SAEConfig fields: \['colour'\]"):
        sp.SAEConfig.from_dict({**d, "colour": "red"})


@pytest.mark.parametrize("kw", [{"tied": "yes"}, {"apply_b_dec_to_input": 1}, {"seed": 1.5}, {"metadata": "x"}])
def test_sae_config_field_types(kw):
    with pytest.raises(ConfigError):
        sp.SAEConfig(d_in=5, d_sae=12, architecture="relu", **kw)


# ------------------------------------------------------------------------------------ SAE methods
def _input_methods(sae: sp.SAE):
    return {"encode": sae.encode, "forward": sae.forward, "pre_acts": sae.pre_acts, "encode_sparse": sae.encode_sparse}


@pytest.mark.parametrize("arch", ARCHS)
def test_sae_methods_reject_bad_input(arch):
    sae = make(arch)
    for fn in _input_methods(sae).values():
        with pytest.raises(ShapeError, match="d_in=5"):
            fn(torch.randn(3, 4))
        with pytest.raises(ShapeError):
            fn(torch.tensor(1.0))
        with pytest.raises(DTypeError, match="floating"):
            fn(torch.ones(3, 5, dtype=torch.int64))
        with pytest.raises(DTypeError, match="convert explicitly"):
            fn(torch.randn(3, 5, dtype=torch.float64))
        x = torch.randn(4, 5)
        x[2, 1] = math.nan
        with pytest.raises(NonFiniteError, match="row 2"):
            fn(x)
        x = torch.randn(2, 3, 5)
        x[1, 0, 4] = -math.inf
        with pytest.raises(NonFiniteError):
            fn(x)
    with pytest.raises(ShapeError, match="d_sae=12"):
        sae.decode(torch.randn(3, 5))
    with pytest.raises(SplinterpError):
        sae.encode([[0.0] * 5])


def test_sae_decode_and_numpy_input_errors():
    sae = make("relu")
    with pytest.raises(DTypeError):
        sae.decode(torch.randn(3, 12, dtype=torch.float64))
    z = torch.zeros(3, 12)
    z[1, 0] = math.nan
    with pytest.raises(NonFiniteError):
        sae.decode(z)
    with pytest.raises(DTypeError, match="numpy"):
        sae.encode(np.zeros((3, 5), np.float32))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_dtype_mismatch_names_both_dtypes(dtype):
    sae = make("topk", dtype)
    with pytest.raises(DTypeError, match=f"but the model uses torch.{dtype}"):
        sae.encode(torch.randn(2, 5))


@settings(max_examples=25, deadline=None)
@given(cfg=sae_configs(dtypes=("float32",)), seed=st.integers(0, 1000))
def test_sae_encode_never_lets_nan_through(cfg, seed):
    sae = randomise(sp.SAE(cfg), seed)
    x = torch.randn(3, cfg.d_in, generator=torch.Generator().manual_seed(seed))
    x[seed % 3, seed % cfg.d_in] = math.nan
    with pytest.raises(NonFiniteError, match=f"row {seed % 3}"):
        sae.encode(x)


@pytest.mark.parametrize("shape", [(0, 5), (2, 0, 5)])
@pytest.mark.parametrize("method", ["encode", "pre_acts", "forward", "encode_sparse"])
@pytest.mark.parametrize("arch", ARCHS)
def test_an_empty_batch_gives_an_empty_result(arch, method, shape):
    """Model methods take any batch, the empty one included; EmptyDataError is for data sets (check_data)."""
    out = getattr(make(arch), method)(torch.zeros(*shape))
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape[:-1] == shape[:-1]


def test_all_finite_is_exact_even_when_the_sum_overflows():
    from splinterp.validation import all_finite

    big = torch.full((4, 3), 3e38)  # finite entries whose float32 sum is inf: the exact check decides
    assert all_finite(big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.zeros(5, 2)
        x[3, 1] = bad
        assert not all_finite(x)
    assert all_finite(torch.empty(0, 3)) and all_finite(torch.arange(5))
    assert not all_finite(torch.tensor([1.0, float("nan")], dtype=torch.float16))


# ------------------------------------------------------------------------------------ memory, predicted up front
def test_a_model_that_cannot_fit_is_refused_with_its_size_before_allocating():
    """`SAE(SAEConfig(d_in=1000, d_sae=10**12))` used to start allocating petabytes."""
    with pytest.raises(TooLargeError, match=r"building SAE\(SAEConfig\(d_in=1000, d_sae=1000000000000\)\) .*needs "
                                            r"about 14\.2 PiB, more than this machine's memory") as e:
        sp.SAE(sp.SAEConfig(d_in=1000, d_sae=10**12, architecture="relu"))
    # 16 bytes per weight of one matrix (two float64 copies while the decoder is drawn), by hand: 1.6e16 B
    assert f"{16 * 1000 * 10**12 / 2**50:.1f} PiB" in str(e.value)
    assert isinstance(e.value, ConfigError)  # a ConfigError: generic handlers of bad settings keep working
    with pytest.raises(TooLargeError, match=r"d_in=10000000, d_sae=10000000"):
        sp.SAEConfig.from_dict({"d_in": 10**7, "d_sae": 10**7, "architecture": "topk", "k": 8})


def test_check_fits_names_the_device(monkeypatch):
    from splinterp import memory

    cfg = sp.SAEConfig(d_in=1000, d_sae=4000, architecture="relu", dtype="float16")
    assert cfg.parameter_bytes() == 2 * (2 * 1000 * 4000 + 1000 + 4000)  # W_enc, W_dec, b_dec, b_enc
    monkeypatch.setattr(memory, "device_memory", lambda dev: 10_000_000 if torch.device(dev).type == "cuda" else 2**40)
    with pytest.raises(TooLargeError, match=r"the float16 parameters of SAEConfig\(d_in=1000, d_sae=4000\) needs about "
                                            r"15\.3 MiB, more than cuda:0's memory: 9\.5 MiB"):
        cfg.check_fits("cuda:0")
    cfg.check_fits("cpu")


PEAK = """
import sys, torch, splinterp as sp
torch.set_num_threads(1)
sp.SAE(sp.SAEConfig(d_in=4, d_sae=8, architecture="relu"))  # warm up the allocator and kernels

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))

cfg = sp.SAEConfig(d_in=1000, d_sae=20000, architecture=sys.argv[1], k=8 if sys.argv[1] == "topk" else None,
                   dtype=sys.argv[2], tied=sys.argv[3] == "tied")
open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) here: import-time peaks do not count
before = status("VmRSS")
sae = sp.SAE(cfg)
print(status("VmHWM") - before, cfg.init_peak_bytes())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc (Linux)")
@pytest.mark.parametrize("arch, dtype, tied, by_hand", [
    # n = 2e7 weights per matrix; vectors b_dec + b_enc = 21,000 numbers
    ("topk", "float32", "untied", 8 * 2 * 10**7 + 4 * (2 * 2 * 10**7 + 21000)),  # draw + W_enc + W_dec + vectors
    ("relu", "float64", "untied", 8 * 2 * 10**7 + 8 * (2 * 10**7 + 21000)),  # W_dec is the drawn copy itself
    ("relu", "float16", "tied", 16 * 2 * 10**7),  # the draw and its normalised copy dominate
])
def test_the_predicted_peak_is_what_the_os_measures(arch, dtype, tied, by_hand):
    out = subprocess.run([sys.executable, "-c", PEAK, arch, dtype, tied], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    measured, predicted = map(int, out.stdout.split())
    assert predicted == by_hand
    assert 0.9 * predicted <= measured <= 1.1 * predicted, (measured, predicted)


# ------------------------------------------------------------------------------------ no assert as a runtime check
def _files_with_asserts() -> dict[str, list[int]]:
    """Library files holding `assert` statements (python -O strips them, so they check nothing there)."""
    import ast
    from pathlib import Path

    root = Path(sp.__file__).parent
    found = {}
    for path in sorted(root.rglob("*.py")):
        lines = [n.lineno for n in ast.walk(ast.parse(path.read_text("utf-8"))) if isinstance(n, ast.Assert)]
        if lines:
            found[path.relative_to(root.parent).as_posix()] = lines
    return found


def test_no_assert_as_a_runtime_check_in_the_library():
    found = _files_with_asserts()
    assert found == {}


def test_no_assert_in_the_experiments():
    assert "splinterp/experiments/capacity.py" not in _files_with_asserts()


@pytest.mark.parametrize("device", ["tpu", "cuda:99", "", 0, None, True, "cpu:x"])
def test_check_device_names_the_argument(device):
    with pytest.raises(ConfigError, match="^where"):
        from splinterp.validation import check_device

        check_device(device, "where")


def test_check_device_accepts_what_is_here():
    from splinterp.validation import check_device

    assert check_device("cpu") == torch.device("cpu") and check_device(torch.device("cpu")).type == "cpu"
    if torch.cuda.is_available():
        assert check_device("cuda:0").index == 0


@pytest.mark.parametrize("field", ["architecture", "dtype"])
@pytest.mark.parametrize("value", [np.zeros(2), ["relu"], torch.zeros(2)])
def test_sae_config_strings_given_arrays_or_lists(field, value):
    """architecture=np.zeros(2) gave numpy's ambiguous-truth ValueError, dtype=[...] an unhashable TypeError."""
    with pytest.raises(ConfigError, match=f"{field} must be one of"):
        sp.SAEConfig(**{"d_in": 3, "d_sae": 4, "architecture": "relu", field: value})


@dataclasses.dataclass
class _Lit:
    mode: Literal["a", "b"] = "a"
    n: Literal[1, 2] = 1


def test_literal_fields_compare_only_like_with_like():
    check_dataclass_types(_Lit())
    for bad in ({"mode": np.array(["a", "a"])}, {"n": True}, {"n": 1.0}, {"mode": ["a"]}):
        with pytest.raises(ConfigError, match="must be"):
            check_dataclass_types(_Lit(**bad))
