"""Sparse kernels against the dense formulas: selection, values, gradients (gradcheck in float64), SAE routing."""

from __future__ import annotations

import importlib.util
import math
from unittest.mock import patch

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import splinterp as sp
from splinterp import kernels
from splinterp.errors import ConfigError, DTypeError, ShapeError
from splinterp.sae import topk_indices


def stable_topk(s: torch.Tensor, k: int) -> torch.Tensor:
    """The tie rule by definition: a stable descending sort (the reference every fast path must equal)."""
    return torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]


ARCHS = [("topk", 4), ("topk_abs", 4), ("relu", None), ("jumprelu", None), ("gated", None)]
HAS_NUMBA = importlib.util.find_spec("numba") is not None
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason="numba (the `fast` extra) is not installed")


@pytest.fixture(params=["numba", "torch"])
def selection(request, monkeypatch):
    """Run the test once with the fused numba CPU selection and once with torch.topk."""
    if request.param == "numba":
        if not HAS_NUMBA:
            pytest.skip("numba (the `fast` extra) is not installed")
        monkeypatch.delenv("SPLINTERP_NUMBA", raising=False)
        monkeypatch.setattr(kernels, "_NUMBA", None)
    else:
        monkeypatch.setattr(kernels, "_NUMBA", False)
    assert kernels.cpu_kernel_backend() == request.param
    return request.param


def randomised(sae: sp.SAE, seed: int = 0, scale: float = 0.3) -> sp.SAE:
    """Move every parameter off its initial value so biases, thresholds and gates all matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)
    return sae


def grads(sae: sp.SAE) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in sae.named_parameters()}


# ------------------------------------------------------------------------------------------ selection
tied_rows = hnp.arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(1, 12)), elements=st.integers(-3, 3))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scores=tied_rows, data=st.data())
def test_topk_select_is_the_stable_sort_even_with_ties(scores, data, selection):
    s = torch.from_numpy(scores)
    k = data.draw(st.integers(1, s.shape[1]))
    assert torch.equal(kernels.topk_select(s, k), stable_topk(s, k))
    assert torch.equal(topk_indices(s, k), stable_topk(s, k))


def test_topk_select_random_rows_and_all_equal_rows(selection):
    s = torch.randn(50, 300, generator=torch.Generator().manual_seed(0))
    s[3] = 0.0  # every score tied (an SAE at initialisation on x = 0)
    s[7, ::2] = s[7, 0]  # a tie straddling the k-th place
    s[9, 4] = float("nan")  # NaN ranks first, as in torch.sort
    for k in (1, 7, 299, 300):
        assert torch.equal(kernels.topk_select(s, k), stable_topk(s, k))
    assert torch.equal(topk_indices(s.view(5, 10, 300), 7), stable_topk(s, 7).view(5, 10, 7))  # leading dims


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 5),
    groups=st.integers(2, 6),
    levels=st.sampled_from([2, 5, 1000]),
    data=st.data(),
)
def test_topk_select_tree_filter_is_exact(rows, groups, levels, data):
    """d_sae a multiple of 64: the two-level candidate filter runs; few distinct values force ties
    between group maxima as well as between scores."""
    n = 64 * groups
    k = data.draw(st.integers(1, groups - 1))
    seed = data.draw(st.integers(0, 2**16))
    s = torch.randint(0, levels, (rows, n), generator=torch.Generator().manual_seed(seed)).double()
    with patch.object(kernels, "TREE_MIN_D_SAE", 0):
        assert kernels._tree_candidates(s, k) is not None
        assert torch.equal(kernels._torch_topk_select(s, k), stable_topk(s, k))


def test_topk_select_tree_filter_on_continuous_scores(monkeypatch):
    monkeypatch.setattr(kernels, "TREE_MIN_D_SAE", 0)
    s = torch.randn(64, 1024, generator=torch.Generator().manual_seed(1))
    for k in (1, 5, 15):
        assert torch.equal(kernels._torch_topk_select(s, k), stable_topk(s, k))


@pytest.mark.parametrize("n", [5, 2**16, 2**16 + 1, 2**20])
def test_stable_argsort_of_latent_ids(n):
    flat = torch.randint(0, n, (5000,), generator=torch.Generator().manual_seed(n))
    flat[:100] = n - 1  # equal keys keep their order
    assert torch.equal(kernels._stable_argsort(flat, n), torch.sort(flat, stable=True).indices)


@pytest.mark.parametrize("n", [7, 512, 1300])
def test_latent_sums_match_index_add(n):
    g = torch.Generator().manual_seed(n)
    idx = torch.randint(0, n, (50, 4), generator=g)
    idx[:, 0] = n - 1  # a crowded last latent, and (for n > 200) latents that never fire
    w = torch.randn(50, 4, generator=g, dtype=torch.float64)
    table = torch.randn(50, 3, generator=g, dtype=torch.float64)
    pat = kernels._LatentMajor().get(idx, n)
    terms = (w[..., None] * table[:, None]).reshape(-1, 3)
    ref = torch.zeros(n, 3, dtype=torch.float64).index_add_(0, idx.reshape(-1), terms)
    torch.testing.assert_close(kernels._latent_sum(pat, w, table), ref)


@pytest.mark.parametrize("B,n", [(30, 8), (6, 40)])
def test_rowdot_batch_major_and_latent_major(B, n):
    g = torch.Generator().manual_seed(2)
    a = torch.randn(B, 5, generator=g, dtype=torch.float64)
    table = torch.randn(n, 5, generator=g, dtype=torch.float64)
    idx = torch.randint(0, n, (B, 3), generator=g)
    ref = (table[idx] * a[:, None, :]).sum(-1)
    pat = kernels._LatentMajor().get(idx, n)
    torch.testing.assert_close(kernels._rowdot(a, table, idx), ref)
    torch.testing.assert_close(kernels._rowdot(a, table, idx, pat), ref)
    torch.testing.assert_close(kernels._rowdot(a.half(), table.half(), idx), ref.half(), rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------------------------------ fused CPU selection
def _reference(u, b, k, absolute):
    s = u + b
    idx = stable_topk(s.abs() if absolute else s, k)
    return idx, s.gather(1, idx)


def _fused(u, b, k, absolute, threads=1):
    from splinterp._numba_kernels import select_rows

    return kernels._fused_topk(lambda *a: select_rows(*a[:4], threads), u, b, k, absolute)


@needs_numba
@settings(max_examples=150, deadline=None)
@given(
    rows=st.integers(1, 150),
    n=st.integers(2, 300),
    levels=st.sampled_from([2, 4, 7, None]),
    absolute=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    data=st.data(),
)
def test_fused_selection_is_the_stable_sort(rows, n, levels, absolute, dtype, data):
    """Exact indices and values, ties broken towards the lower index; few distinct levels force ties at the
    k-th place, all-equal rows and guesses that fail (those rows go through torch); rows >= 128 use 2 threads."""
    k = data.draw(st.integers(1, n - 1))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    if levels is None:
        u, b = torch.randn(rows, n, generator=g, dtype=dtype), torch.randn(n, generator=g, dtype=dtype)
    else:
        u = torch.randint(-levels, levels + 1, (rows, n), generator=g).to(dtype)
        b = torch.randint(-1, 2, (n,), generator=g).to(dtype)
    threads = data.draw(st.sampled_from([1, 2, 3]))
    idx, vals = _fused(u, b, k, absolute, threads)
    ref_idx, ref_vals = _reference(u, b, k, absolute)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(vals, ref_vals)


@needs_numba
@pytest.mark.parametrize("n,k", [(4096, 32), (1000, 1), (1001, 37), (300, 256), (16384, 64)])
@pytest.mark.parametrize("absolute", [False, True])
def test_fused_selection_decides_continuous_rows_itself(n, k, absolute):
    """On continuous scores no row is handed back to torch (the fast path is the path), and the answer is
    exact; n not a multiple of the block count leaves latents in no block (the tail)."""
    from splinterp._numba_kernels import select_rows

    g = torch.Generator().manual_seed(n + k)
    u, b = torch.randn(256, n, generator=g), torch.randn(n, generator=g)
    idx, vals, bad = select_rows(u, b, k, absolute, 2)
    assert not bad.any()
    ref_idx, ref_vals = _reference(u, b, k, absolute)
    assert torch.equal(idx, ref_idx) and torch.equal(vals, ref_vals)


@needs_numba
def _stable_topk(row: list[float], k: int) -> list[int]:
    """The tie rule by definition, in plain Python: largest first, NaN ranked above everything (as torch.sort
    ranks it), equal values towards the lower index."""
    def key(i: int):
        v = row[i]
        return (0, 0.0, i) if math.isnan(v) else (1, -v, i)

    return sorted(range(len(row)), key=key)[:k]


def test_fused_selection_with_nan_and_inf_matches_torch():
    """NaN rows are handed back to torch (NaN ranks first, as torch.sort puts it); +-inf are ordinary."""
    from splinterp._numba_kernels import select_rows

    g = torch.Generator().manual_seed(3)
    u, b = torch.randn(8, 200, generator=g), torch.zeros(200)
    u[1, 50] = float("nan")
    u[2, :] = float("inf")
    u[3, ::3] = -float("inf")
    u[4, :] = -float("inf")
    u[5, 7] = float("inf")
    u[6, 199] = float("nan")  # in the tail or a late block
    _, _, bad = select_rows(u, b, 5, False, 1)
    assert bad[1] and bad[6]
    for absolute in (False, True):
        idx, vals = _fused(u, b, 5, absolute)
        s = (u + b).abs() if absolute else u + b
        ref_idx = torch.tensor([_stable_topk(row, 5) for row in s.tolist()])
        assert torch.equal(idx, ref_idx)
        torch.testing.assert_close(vals, (u + b).gather(1, ref_idx), equal_nan=True)


@needs_numba
def test_encode_topk_same_with_either_selection(monkeypatch):
    x, W, b = _affine(B=300, d_in=7, n=64, seed=8)
    out = {}
    for backend in ("numba", "torch"):
        monkeypatch.setattr(kernels, "_NUMBA", None if backend == "numba" else False)
        assert kernels.cpu_kernel_backend() == backend
        for absolute in (False, True):
            for t in (x, W, b):
                t.grad = None
            vals, idx = kernels.encode_topk(x, W, b, 9, absolute=absolute)
            (vals * torch.arange(9.0, dtype=vals.dtype)).sum().backward()
            out[backend, absolute] = (vals.detach(), idx, x.grad.clone(), W.grad.clone(), b.grad.clone())
    for absolute in (False, True):
        for a, c in zip(out["numba", absolute], out["torch", absolute], strict=True):
            assert torch.equal(a, c)


def test_selection_backend_switch(monkeypatch):
    monkeypatch.setattr(kernels, "_NUMBA", None)
    monkeypatch.setenv("SPLINTERP_NUMBA", "0")
    assert kernels.cpu_kernel_backend() == "torch"
    monkeypatch.setattr(kernels, "_NUMBA", None)
    monkeypatch.delenv("SPLINTERP_NUMBA")
    assert kernels.cpu_kernel_backend() == ("numba" if HAS_NUMBA else "torch")


def test_topk_select_rejects_bad_k_and_shapes():
    with pytest.raises(ConfigError):
        kernels.topk_select(torch.zeros(2, 5), 6)
    with pytest.raises(ConfigError):
        kernels.topk_select(torch.zeros(2, 5), 0)
    with pytest.raises(ShapeError):
        kernels.topk_select(torch.zeros(5), 2)


# ------------------------------------------------------------------------------------------ gradcheck
def _affine(B=5, d_in=4, n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(d_in, n, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, generator=g, dtype=torch.float64, requires_grad=True)
    return x, W, b


@pytest.mark.parametrize("absolute", [False, True])
def test_encode_topk_gradcheck(absolute):
    x, W, b = _affine()
    # small perturbations cannot change the selection of continuous random scores
    assert torch.autograd.gradcheck(lambda x, W, b: kernels.encode_topk(x, W, b, 3, absolute=absolute)[0], (x, W, b))


def test_decode_gradcheck():
    g = torch.Generator().manual_seed(1)
    vals = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(6)])
    idx[0] = torch.tensor([5, 5, 2])  # a repeated latent in one row still sums
    W_dec = torch.randn(8, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b_dec = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, W, b: kernels.decode(v, idx, W, b), (vals, W_dec, b_dec))


def test_encode_masked_gradcheck():
    x, W, b = _affine(seed=2)

    def f(x, W, b):
        u = (x @ W + b).detach()
        return kernels.encode_masked(x, W, b, u, u > 0.3)[0]

    assert torch.autograd.gradcheck(f, (x, W, b))


def test_topk_relu_zero_values_pass_no_gradient():
    x, W, b = _affine(seed=3)
    with torch.no_grad():
        b -= 10.0  # every score negative: the code is all zeros
    vals, _ = kernels.encode_topk(x, W, b, 3)
    vals.sum().backward()
    assert torch.equal(vals, torch.zeros_like(vals))
    assert not W.grad.any() and not b.grad.any() and not x.grad.any()


# ------------------------------------------------------------------------------------------ SAE routing
@pytest.mark.parametrize("arch,k", ARCHS)
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("b_dec_in", [False, True])
def test_sae_sparse_path_matches_dense_float64(arch, k, tied, b_dec_in, selection):
    sae = randomised(sp.make_sae(6, 20, arch, k, tied=tied, apply_b_dec_to_input=b_dec_in, dtype="float64"), 1)
    x = torch.randn(2, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))  # leading dims
    weight = torch.linspace(-1, 1, 20, dtype=torch.float64)
    out = {}
    for dense in (True, False):
        sae.zero_grad()
        x_hat = sae(x, dense=dense)
        z = sae.encode(x, dense=dense)
        vals, idx = sae.encode_sparse(x, dense=dense)
        loss = (x_hat - x).pow(2).sum() + (z * weight).sum() + (vals.pow(2) * (idx + 1)).sum()
        loss.backward()
        out[dense] = (x_hat.detach(), z.detach(), vals.detach(), idx, grads(sae))
    (xd, zd, vd, id_, gd), (xs, zs, vs, is_, gs) = out[True], out[False]
    assert xs.shape == x.shape and zs.shape == (2, 5, 20)
    torch.testing.assert_close(xs, xd)
    torch.testing.assert_close(zs, zd)
    assert torch.equal(is_, id_)
    torch.testing.assert_close(vs, vd)
    assert gs.keys() == gd.keys()
    for name in gd:
        if gd[name] is None:
            assert gs[name] is None, name
        else:
            torch.testing.assert_close(gs[name], gd[name], msg=name)


@pytest.mark.parametrize("arch,k", [("topk", 16), ("topk_abs", 16), ("relu", None)])
def test_sae_adam_steps_match_dense_float32(arch, k, selection):
    """A few full training steps at a realistic width: same weights to float32 tolerance."""
    torch.manual_seed(0)
    x = torch.randn(96, 40)
    models = {}
    for dense in (True, False):
        sae = sp.make_sae(40, 256, arch, k, seed=3)
        if arch == "relu":
            with torch.no_grad():
                sae.b_enc -= 2.5  # sparse enough for the sparse route (and it must be the one taken)
                assert kernels.is_sparse_enough(sae.select(sae.pre_acts(x)))
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
        for _ in range(3):
            opt.zero_grad()
            (sae(x, dense=dense) - x).pow(2).mean().backward()
            opt.step()
        models[dense] = sae
    for (name, a), (_, b) in zip(models[True].named_parameters(), models[False].named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


def test_topk_values_and_indices_are_canonical():
    """encode_sparse's TopK indices are the k largest scores by the tie rule (a plain-Python sort of the
    scores, not the selection code), its values those scores where positive and 0 elsewhere."""
    sae = randomised(sp.make_sae(8, 30, "topk", 5), 5)
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    vals, idx = sae.encode_sparse(x)
    u = sae.pre_acts(x).detach()
    ref_idx = torch.tensor([_stable_topk(row, 5) for row in u.tolist()])
    assert torch.equal(idx, ref_idx)
    ref_vals = u.gather(1, ref_idx).clamp(min=0)
    assert torch.equal(vals.detach(), ref_vals)


def test_ties_follow_the_lower_index_rule():
    """x = 0 and b_enc = 0: every score ties and the code is latents 0..k-1 (topk_abs) at value 0."""
    sae = sp.make_sae(4, 12, "topk_abs", 3)
    vals, idx = sae.encode_sparse(torch.zeros(2, 4))
    assert idx.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert not vals.any()


def test_small_chunks_give_the_same_code():
    x, W, b = _affine(B=23, n=17, seed=6)
    v1, i1 = kernels.encode_topk(x, W, b, 4)
    v2, i2 = kernels.encode_topk(x, W, b, 4, chunk_rows=5)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(v1, v2)  # a BLAS may block a matmul differently for fewer rows


def test_grad_through_the_input():
    sae = randomised(sp.make_sae(6, 20, "topk", 4, dtype="float64"), 7)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    g = {}
    for dense in (True, False):
        x.grad = None
        sae(x, dense=dense).pow(2).sum().backward()
        g[dense] = x.grad.clone()
    torch.testing.assert_close(g[False], g[True])


def test_dense_relu_codes_fall_back_to_the_dense_route():
    sae = sp.make_sae(6, 20, "relu")
    with torch.no_grad():
        sae.b_enc += 5.0  # everything fires
    x = torch.randn(4, 6)
    assert not kernels.is_sparse_enough(sae.select(sae.pre_acts(x)))
    _, idx = sae._code(x)
    assert idx is None
    torch.testing.assert_close(sae(x), sae(x, dense=True))


def test_switches():
    sae = randomised(sp.make_sae(6, 20, "topk", 4), 8)
    x = torch.randn(3, 6)
    assert kernels.sparse_enabled()
    with kernels.dense_reference():
        assert not kernels.sparse_enabled()
        assert sae._code(x)[1] is None
    assert kernels.sparse_enabled()
    assert sae._code(x)[1] is not None


def test_the_transposed_pattern_is_built_once_and_rebuilt_after_an_in_place_edit():
    sae = randomised(sp.make_sae(6, 20, "topk", 4), 9)
    vals, idx = sae.encode_sparse(torch.randn(5, 6))
    x_hat = kernels.decode(vals, idx, sae.W_dec, sae.b_dec)
    x_hat.sum().backward()
    holder = idx._splinterp_latent_major
    rows = holder.rows
    assert rows is not None and holder.get(idx, 20).rows is rows  # decoder and encoder shared one sort
    idx[0, 0] = 19 if idx[0, 0] != 19 else 18
    assert holder.get(idx, 20).rows is not rows


def test_empty_batch():
    sae = sp.make_sae(6, 20, "topk", 4)
    x = torch.zeros(0, 6)
    x_hat = sae(x)
    assert x_hat.shape == (0, 6)
    x_hat.sum().backward()
    assert not sae.W_enc.grad.any()


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_a_batch_where_no_latent_fires(arch):
    """Found by the long fuzz profile: a threshold SAE whose codes are all zero on a batch took the sparse path
    with zero columns and failed inside embedding_bag. Output b_dec and the plain formulas' gradients."""
    sae = sp.make_sae(6, 20, arch, apply_b_dec_to_input=True)  # the gradient then flows back into x - b_dec
    with torch.no_grad():
        (sae.b_enc if arch == "relu" else sae.threshold).copy_(
            torch.full((20,), -50.0) if arch == "relu" else torch.full((20,), 50.0))
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    assert not sae.encode(x, dense=True).any()
    vals, idx = sae.encode_sparse(x)  # the trainers' path: sparse code, then the sparse decode
    out = kernels.decode(vals, idx, sae.W_dec, sae.b_dec)
    torch.testing.assert_close(out, sae.b_dec.expand(5, 6))
    out.pow(2).sum().backward()
    sparse_grads = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
    sae.zero_grad()
    sae.forward(x, dense=True).pow(2).sum().backward()
    for n, g in sparse_grads.items():
        torch.testing.assert_close(g, sae.get_parameter(n).grad, msg=n)


def test_deterministic_gradients():
    sae = randomised(sp.make_sae(16, 128, "topk", 8), 10)
    x = torch.randn(64, 16)
    runs = []
    for _ in range(2):
        sae.zero_grad()
        sae(x).pow(2).sum().backward()
        runs.append(grads(sae))
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


def test_half_precision_runs():
    for dt in ("bfloat16", "float16"):
        sae = randomised(sp.make_sae(8, 32, "topk", 4, dtype=dt), 11, scale=0.1)
        x = torch.randn(5, 8).to(sae.dtype)
        sae(x).float().pow(2).sum().backward()
        torch.testing.assert_close(sae(x), sae(x, dense=True), rtol=2e-2, atol=2e-2)


def test_double_backward_is_refused():
    x, W, b = _affine(seed=12)
    vals, _ = kernels.encode_topk(x, W, b, 3)
    (gW,) = torch.autograd.grad(vals.pow(2).sum(), W, create_graph=True)
    with pytest.raises(RuntimeError):
        gW.sum().backward()


def test_bad_arguments():
    x, W, b = _affine()
    with pytest.raises(ConfigError):
        kernels.encode_topk(x, W, b, 10)
    with pytest.raises(ShapeError):
        kernels.encode_topk(x, W.T, b, 2)
    with pytest.raises(DTypeError):
        kernels.encode_topk(x.long(), W, b, 2)
    with pytest.raises(DTypeError):
        kernels.encode_topk(x.float(), W, b, 2)
    with pytest.raises(ShapeError):
        kernels.decode(torch.zeros(3, 2), torch.zeros(3, 3, dtype=torch.long), torch.zeros(5, 4))
    with pytest.raises(DTypeError):
        kernels.decode(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(5, 4))
    with pytest.raises(ShapeError):
        kernels.mask_to_padded(torch.zeros(3, 2))
