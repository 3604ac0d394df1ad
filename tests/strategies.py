"""Hypothesis strategies for SAEs, data and SAE folders, for any test module to import.

    from strategies import saes, sae_configs, data_matrices, folder_mutations, apply_mutation

(pytest puts tests/ on sys.path, so a plain `from strategies import ...` works from any test file.)
Sizes are tiny by default so that a property test with 25 examples stays under a few seconds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from splinterp import ARCHITECTURES, SAE, SAEConfig
from splinterp.sae import DTYPES, TOPK_ARCHITECTURES

DTYPE_NAMES = tuple(DTYPES)


@st.composite
def sae_configs(
    draw,
    architectures=ARCHITECTURES,
    dtypes=DTYPE_NAMES,
    max_d_in: int = 8,
    max_d_sae: int = 16,
    tied: bool | None = None,
    apply_b_dec_to_input: bool | None = None,
) -> SAEConfig:
    """A valid SAEConfig of any architecture (k drawn in [1, d_sae] for the TopK ones)."""
    arch = draw(st.sampled_from(architectures))
    d_in = draw(st.integers(1, max_d_in))
    d_sae = draw(st.integers(1, max_d_sae))
    return SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        architecture=arch,
        k=draw(st.integers(1, d_sae)) if arch in TOPK_ARCHITECTURES else None,
        tied=draw(st.booleans()) if tied is None else tied,
        apply_b_dec_to_input=draw(st.booleans()) if apply_b_dec_to_input is None else apply_b_dec_to_input,
        seed=draw(st.integers(0, 2**31 - 1)),
        dtype=draw(st.sampled_from(dtypes)),
        jumprelu_init_threshold=draw(st.floats(0, 1)),
        metadata=draw(st.sampled_from([{}, {"hook_name": "blocks.0.hook_resid_post", "model_name": "toy"}])),
    )


def randomise(sae: SAE, seed: int) -> SAE:
    """Fill every parameter with seeded random values (biases non-zero, thresholds in [0, 0.5)); in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                r = torch.rand(p.shape, generator=g, dtype=torch.float64) * 0.5
            else:
                r = torch.randn(p.shape, generator=g, dtype=torch.float64)
                r *= 0.3 if name == "r_mag" else 0.5 if name.startswith("b_") else 1.0
            p.copy_(r.to(p.dtype))
    return sae


@st.composite
def saes(draw, **config_kw) -> SAE:
    """A small SAE with random weights (any architecture/dtype/tied unless fixed through `config_kw`)."""
    cfg = draw(sae_configs(**config_kw))
    return randomise(SAE(cfg), cfg.seed)


@st.composite
def data_matrices(
    draw, d_in: int, dtype: torch.dtype = torch.float32, min_rows: int = 1, max_rows: int = 16, scale: float = 4.0
) -> torch.Tensor:
    """A finite data matrix [N, d_in] (shrinks towards small, simple values)."""
    n = draw(st.integers(min_rows, max_rows))
    width = 16 if dtype in (torch.float16, torch.bfloat16) else 32
    arr = draw(hnp.arrays(np.float32 if width == 32 else np.float16, (n, d_in),
                          elements=st.floats(-scale, scale, width=width)))
    return torch.from_numpy(arr.astype(np.float64)).to(dtype)


@st.composite
def non_finite_data(draw, d_in: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, int]:
    """(X, row): a data matrix with one NaN / +inf / -inf planted at `row` (the first bad row)."""
    x = draw(data_matrices(d_in, dtype=dtype))
    row = draw(st.integers(0, x.shape[0] - 1))
    col = draw(st.integers(0, d_in - 1))
    x[row, col] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return x, row


# ------------------------------------------------------------------------------------------ folders
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.sampled_from([-(2**40), 2**40, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["float16", "torch.float32", "standard", "topk", "abstopk", "gated", "jumprelu", "none",
                     "layer_norm", "expected_average_only_in", "batchtopk", "cuda:7"]),
)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=5), inner, max_size=3), max_leaves=5)


@dataclass(frozen=True)
class Mutation:
    """One damage done to an SAE folder; `apply_mutation` performs it. Indices are taken modulo what exists."""

    kind: str  # truncate | flip | garbage | delete_file | cfg_set | cfg_delete | cfg_add | cfg_not_object
    target: str = "weights"  # "cfg" or "weights"
    where: float = 0.0  # position as a fraction of the file length
    index: int = 0  # which byte count / key path / bit
    value: Any = None


def folder_mutations() -> st.SearchStrategy[Mutation]:
    files = st.sampled_from(["cfg", "weights"])
    frac = st.floats(0, 1, exclude_max=True)
    return st.one_of(
        st.builds(Mutation, kind=st.just("truncate"), target=files, where=frac),
        st.builds(Mutation, kind=st.just("flip"), target=files, where=frac, index=st.integers(0, 7),
                  value=st.integers(1, 3)),
        st.builds(Mutation, kind=st.just("garbage"), target=files, value=st.binary(max_size=64)),
        st.builds(Mutation, kind=st.just("delete_file"), target=files),
        st.builds(Mutation, kind=st.just("cfg_set"), target=st.just("cfg"), index=st.integers(0, 10**6),
                  value=json_values),
        st.builds(Mutation, kind=st.just("cfg_delete"), target=st.just("cfg"), index=st.integers(0, 10**6)),
        st.builds(Mutation, kind=st.just("cfg_add"), target=st.just("cfg"), index=st.integers(0, 1),
                  value=json_values),
        st.builds(Mutation, kind=st.just("cfg_not_object"), target=st.just("cfg"), value=json_scalars),
    )


def _key_paths(d: Any, prefix: tuple = ()) -> list[tuple]:
    paths = []
    if isinstance(d, dict):
        for k, v in d.items():
            paths.append(prefix + (k,))
            paths += _key_paths(v, prefix + (k,))
    return paths


def _weights_file(folder: Path) -> Path:
    for name in ("sae_weights.safetensors", "sae.safetensors"):
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"no weights file in {folder}")


def apply_mutation(folder: str | Path, m: Mutation) -> None:
    """Damage `folder` in place as `m` says. A mutation with nothing to act on (a file already deleted, a cfg
    that is no longer JSON) does nothing, so mutations can be chained."""
    folder = Path(folder)
    try:
        path = folder / "cfg.json" if m.target == "cfg" else _weights_file(folder)
    except FileNotFoundError:
        return
    if not path.exists():
        return
    if m.kind == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * m.where)])
    elif m.kind == "flip":
        data = bytearray(path.read_bytes())
        if not data:
            return
        pos = int(len(data) * m.where)
        for i in range(m.value):
            data[(pos + 7919 * i) % len(data)] ^= 1 << ((m.index + i) % 8)
        path.write_bytes(bytes(data))
    elif m.kind == "garbage":
        path.write_bytes(m.value)
    elif m.kind == "delete_file":
        path.unlink()
    else:
        try:
            cfg = json.loads((folder / "cfg.json").read_text())
        except ValueError:
            return
        if m.kind != "cfg_not_object" and not isinstance(cfg, dict):
            return
        if m.kind == "cfg_not_object":
            cfg = m.value
        elif m.kind == "cfg_add":
            block = cfg["splinterp"] if (m.index == 0 and isinstance(cfg.get("splinterp"), dict)) else cfg
            block["not_a_field"] = m.value
        else:
            paths = _key_paths(cfg)
            if not paths:
                return
            p = paths[m.index % len(paths)]
            parent = cfg
            for k in p[:-1]:
                parent = parent[k]
            if m.kind == "cfg_set":
                parent[p[-1]] = m.value
            else:
                del parent[p[-1]]
        (folder / "cfg.json").write_text(json.dumps(cfg))
