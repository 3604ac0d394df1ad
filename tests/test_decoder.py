"""The closed-form decoder solve against an independent augmented least-squares solve, the paper's
eliminated form, batch accumulation, sparse == dense, and the singular cases."""

import logging

import pytest
import torch

from splinterp.errors import ConfigError, NonFiniteError, ShapeError
from splinterp.train.decoder import DecoderAccumulator, SparseCodes, solve_decoder

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(seed, N=120, d=12, k=3, n=5):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, n, generator=g, dtype=F64) + 1.5
    idx = torch.stack([torch.randperm(d, generator=g)[:k] for _ in range(N)])
    vals = torch.randn(N, k, generator=g, dtype=F64)
    W_prev = torch.randn(d, n, generator=g, dtype=F64)
    b_prev = torch.randn(n, generator=g, dtype=F64)
    return X, SparseCodes(vals, idx, d), W_prev, b_prev


def _augmented_lstsq(Z, X, alpha, beta, mu, nu, W_prev, b_prev):
    """min |[Z 1] theta - X|^2 + regulariser rows, theta = [W; b^T], solved by QR-based lstsq."""
    N, d = Z.shape
    n = X.shape[1]
    I, zc, zr = torch.eye(d, dtype=F64), torch.zeros(d, 1, dtype=F64), torch.zeros(1, d, dtype=F64)
    one = torch.ones(1, 1, dtype=F64)
    A = torch.cat([
        torch.cat([Z, torch.ones(N, 1, dtype=F64)], 1),
        torch.cat([alpha ** 0.5 * I, zc], 1),
        torch.cat([mu ** 0.5 * I, zc], 1),
        torch.cat([zr, beta ** 0.5 * one], 1),
        torch.cat([zr, nu ** 0.5 * one], 1),
    ])
    B = torch.cat([X, torch.zeros(d, n, dtype=F64), mu ** 0.5 * W_prev, torch.zeros(1, n, dtype=F64),
                   nu ** 0.5 * b_prev[None]])
    theta = torch.linalg.lstsq(A, B, driver="gelsd").solution
    return theta[:d], theta[d]


def _objective(Z, X, W, b, alpha=0.0, beta=0.0, mu=0.0, nu=0.0, W_prev=None, b_prev=None):
    v = ((X - Z @ W - b) ** 2).sum() + alpha * (W ** 2).sum() + beta * (b ** 2).sum()
    if mu:
        v = v + mu * ((W - W_prev) ** 2).sum()
    if nu:
        v = v + nu * ((b - b_prev) ** 2).sum()
    return float(v)


@pytest.mark.parametrize("seed", range(6))
def test_matches_augmented_least_squares(seed):
    X, sc, Wp, bp = _problem(seed)
    g = torch.Generator().manual_seed(100 + seed)
    alpha, beta, mu, nu = (torch.rand(4, generator=g, dtype=F64) * torch.tensor([2.0, 5.0, 2.0, 5.0])).tolist()
    if seed == 0:
        alpha = beta = mu = nu = 0.0  # plain least squares with an intercept
    W_ref, b_ref = _augmented_lstsq(sc.to_dense(), X, alpha, beta, mu, nu, Wp, bp)
    for Z in (sc, sc.to_dense()):
        W, b = solve_decoder(Z, X, alpha, beta, mu, nu, W_prev=Wp, b_prev=bp)
        assert W.shape == (12, 5) and b.shape == (5,) and W.dtype == F64
        torch.testing.assert_close(W, W_ref, rtol=1e-8, atol=1e-9)
        torch.testing.assert_close(b, b_ref, rtol=1e-8, atol=1e-9)


def test_matches_paper_eliminated_form():
    """Section 4.3: W A = C with the z-bar rank-one correction, then the bias line."""
    X, sc, Wp, bp = _problem(7)
    alpha, beta, mu, nu = 0.3, 0.7, 0.2, 1.1
    Z = sc.to_dense()
    N = X.shape[0]
    zbar, xbar = Z.mean(0), X.mean(0)
    gamma = N / (N + beta + nu)
    # paper writes W_dec as [n, d]; ours is its transpose
    A = (alpha + mu) * torch.eye(12, dtype=F64) + Z.T @ Z - N * gamma * torch.outer(zbar, zbar)
    C = mu * Wp.T + X.T @ Z - gamma * torch.outer(N * xbar + nu * bp, zbar)
    W_paper = torch.linalg.solve(A, C.T)  # A symmetric: (W^T A = C) <=> A W = C^T
    b_paper = (nu * bp + N * (xbar - W_paper.T @ zbar)) / (N + beta + nu)
    W, b = solve_decoder(sc, X, alpha, beta, mu, nu, W_prev=Wp, b_prev=bp)
    torch.testing.assert_close(W, W_paper, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(b, b_paper, rtol=1e-9, atol=1e-10)


def test_ols_special_case_is_centred_regression():
    X, sc, _, _ = _problem(3)
    Z = sc.to_dense()
    Zc, Xc = Z - Z.mean(0), X - X.mean(0)
    W_ols = torch.linalg.solve(Zc.T @ Zc, Zc.T @ Xc)
    W, b = solve_decoder(sc, X)
    torch.testing.assert_close(W, W_ols, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(b, X.mean(0) - Z.mean(0) @ W_ols, rtol=1e-9, atol=1e-10)


def test_accumulator_equals_full_batch_and_sparse_equals_dense():
    X, sc, Wp, bp = _problem(11, N=97)
    args = (0.1, 0.2, 0.3, 0.4, Wp, bp)
    W_full, b_full = solve_decoder(sc, X, *args)
    for method in ("sparse", "dense"):
        acc = DecoderAccumulator(12, 5, method=method)
        for a, b in ((0, 1), (1, 40), (40, 41), (41, 97)):
            acc.update(sc[a:b], X[a:b])
        assert acc.n == 97
        unchecked = DecoderAccumulator(12, 5, method=method).update(sc, X, check=False)
        torch.testing.assert_close(unchecked.G, acc.G, rtol=1e-12, atol=1e-12)
        W, b = acc.solve(*args, out_dtype=F64)
        torch.testing.assert_close(W, W_full, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b, b_full, rtol=1e-10, atol=1e-12)
    Zd = sc.to_dense()
    acc = DecoderAccumulator(12, 5, method="sparse").update(sc, X)
    torch.testing.assert_close(acc.G, Zd.T @ Zd, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.S_zx, Zd.T @ X, rtol=1e-12, atol=1e-12)


def test_repeated_indices_and_float32_input():
    vals = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0], [1.0, 1.0, 0.0]], dtype=F64)
    idx = torch.tensor([[0, 0, 2], [1, 3, 1], [2, 2, 0]])
    sc = SparseCodes(vals, idx, 4)
    Zd = sc.to_dense()
    assert Zd.tolist() == [[3.0, 0.0, 3.0, 0.0], [0.0, 2.5, 0.0, -1.0], [0.0, 0.0, 2.0, 0.0]]
    X = torch.randn(3, 2, dtype=F64)
    acc = DecoderAccumulator(4, 2, method="sparse").update(sc, X)
    torch.testing.assert_close(acc.G, Zd.T @ Zd)
    # float32 data: statistics still in float64, answer returned in float32
    W, b = solve_decoder(SparseCodes(vals.float(), idx, 4), X.float(), alpha=0.5)
    W64, b64 = solve_decoder(Zd, X, alpha=0.5)
    assert W.dtype == torch.float32
    torch.testing.assert_close(W, W64.float(), rtol=1e-5, atol=1e-6)


def test_torch_sparse_input_and_from_dense():
    X, sc, _, _ = _problem(5)
    Zd = sc.to_dense()
    back = SparseCodes.from_dense(Zd)
    assert torch.equal(back.to_dense(), Zd)
    W1, b1 = solve_decoder(Zd.to_sparse(), X, alpha=0.1)
    W2, b2 = solve_decoder(sc, X, alpha=0.1)
    torch.testing.assert_close(W1, W2, rtol=1e-10, atol=1e-12)


def test_dead_latents_keep_previous_rows_without_warning(caplog):
    X, sc, Wp, bp = _problem(2, d=12)
    vals = sc.values.clone()
    vals[sc.indices >= 10] = 0.0  # latents 10 and 11 never fire
    sc = SparseCodes(vals, sc.indices, 12)
    with caplog.at_level(logging.WARNING, logger="splinterp.train.decoder"):
        W, b = solve_decoder(sc, X, W_prev=Wp, b_prev=bp)
    assert not caplog.records
    assert torch.equal(W[10:], Wp[10:])
    W0, _ = solve_decoder(sc, X)
    assert torch.all(W0[10:] == 0)
    Z = sc.to_dense()
    W_ref, b_ref = _augmented_lstsq(Z, X, 0, 0, 0, 0, Wp, bp)
    torch.testing.assert_close(W[:10], W_ref[:10], rtol=1e-8, atol=1e-9)
    assert _objective(Z, X, W, b) == pytest.approx(_objective(Z, X, W_ref, b_ref), rel=1e-10)


def test_singular_system_falls_back_with_warning(caplog):
    """Two latents that always fire together with equal values: Z^T Z is singular with no ridge."""
    X, sc, _, _ = _problem(4, d=12)
    Z = sc.to_dense()
    Z[:, 1] = Z[:, 0]
    with caplog.at_level(logging.WARNING, logger="splinterp.train.decoder"):
        W, b = solve_decoder(Z, X, method="dense")
    assert any("minimum-norm" in r.getMessage() for r in caplog.records)
    W_ref, b_ref = _augmented_lstsq(Z, X, 0, 0, 0, 0, torch.zeros(12, 5, dtype=F64), torch.zeros(5, dtype=F64))
    assert _objective(Z, X, W, b) == pytest.approx(_objective(Z, X, W_ref, b_ref), rel=1e-9)
    torch.testing.assert_close(W[0], W[1])  # minimum norm splits the shared direction evenly
    # a small ridge makes it well posed again: no warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="splinterp.train.decoder"):
        solve_decoder(Z, X, alpha=1e-3)
    assert not caplog.records


def test_errors():
    X, sc, Wp, bp = _problem(0)
    with pytest.raises(ConfigError):
        solve_decoder(sc, X, mu=1.0)  # no W_prev
    with pytest.raises(ConfigError):
        solve_decoder(sc, X, nu=1.0, W_prev=Wp)  # no b_prev
    with pytest.raises(ConfigError):
        solve_decoder(sc, X, alpha=-1.0)
    with pytest.raises(ShapeError):
        solve_decoder(sc, X[:-1])
    with pytest.raises(ShapeError):
        solve_decoder(sc, X, mu=1.0, W_prev=Wp[:-1], b_prev=bp)
    with pytest.raises(ShapeError):
        SparseCodes(sc.values, sc.indices + 12, 12)
    Zbad = sc.to_dense()
    Zbad[3, 2] = float("nan")
    with pytest.raises(NonFiniteError):
        solve_decoder(Zbad, X)
    with pytest.raises(ConfigError):
        DecoderAccumulator(3, 2, method="magic")


def test_large_batches_split_in_halves_are_exact_and_thread_count_independent():
    """Batches of >= 4096 rows are summed as two halves (on a worker thread when torch has threads)."""
    X, sc, Wp, bp = _problem(9, N=5000, d=10, k=3, n=4)
    Zd = sc.to_dense()
    results = []
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            acc = DecoderAccumulator(10, 4, method="sparse").update(sc, X)
            results.append((acc.G, acc.S_zx, acc.s_z, acc.solve(0.1, 0.2, 0.3, 0.4, Wp, bp, out_dtype=F64)))
        finally:
            torch.set_num_threads(old)
    G, S, s, (W, b) = results[0]
    torch.testing.assert_close(G, Zd.T @ Zd, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(S, Zd.T @ X, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(s, Zd.sum(0), rtol=1e-12, atol=1e-10)
    G2, S2, s2, (W2, b2) = results[1]
    assert torch.equal(G, G2) and torch.equal(S, S2) and torch.equal(W, W2) and torch.equal(b, b2)
    W_ref, b_ref = _augmented_lstsq(Zd, X, 0.1, 0.2, 0.3, 0.4, Wp, bp)
    torch.testing.assert_close(W, W_ref, rtol=1e-8, atol=1e-9)


def test_non_finite_codes_are_refused_even_unchecked():
    X, sc, _, _ = _problem(1)
    vals = sc.values.clone()
    vals[5, 1] = float("inf")
    acc = DecoderAccumulator(12, 5).update(SparseCodes(vals, sc.indices, 12), X, check=False)
    with pytest.raises(NonFiniteError):
        acc.solve(alpha=0.1)


def test_no_worker_thread_outlives_a_split_update():
    """The helper thread that scatters half of a large batch is scoped to that update: none is left running
    afterwards (an idle pool thread used to stay alive for the life of the process)."""
    import threading

    from splinterp.train.decoder import WORKER_THREAD_NAME

    X, sc, _, _ = _problem(9, N=5000, d=10, k=3, n=4)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        acc = DecoderAccumulator(10, 4, method="sparse").update(sc, X)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(acc.G, sc.to_dense().T @ sc.to_dense(), rtol=1e-12, atol=1e-10)
    alive = [t.name for t in threading.enumerate() if t.name.startswith(WORKER_THREAD_NAME)]
    assert alive == []


# ------------------------------------------------------------------------------- relative weights
@pytest.mark.parametrize("c, s", [(2.0, 2.0), (3.7, 3.7), (0.01, 0.01), (-2.5, 4.0), (1e3, 0.5)])
def test_relative_weights_make_the_step_scale_equivariant(c, s):
    """Codes c Z, data s X, anchors (s/c) W_prev and s b_prev give (s/c) W and s b (c = s: the same W and
    c b), with fewer rows than latents; absolute weights do not have this property."""
    X, sc, Wp, bp = _problem(21, N=40, d=64, k=5, n=7)
    w = dict(alpha=0.03, beta=0.2, mu=1.0, nu=1.0)
    W, b = solve_decoder(sc, X, **w, W_prev=Wp, b_prev=bp, scale="relative")
    sc2 = SparseCodes(c * sc.values, sc.indices, 64)
    W2, b2 = solve_decoder(sc2, s * X, **w, W_prev=(s / c) * Wp, b_prev=s * bp, scale="relative")
    torch.testing.assert_close(W2, (s / c) * W, rtol=1e-9, atol=1e-12 * abs(s / c))
    torch.testing.assert_close(b2, s * b, rtol=1e-9, atol=1e-12 * abs(s))
    W3, _ = solve_decoder(sc2, s * X, **w, W_prev=(s / c) * Wp, b_prev=s * bp, scale="absolute")
    if abs(c) != 1:
        assert not torch.allclose(W3, (s / c) * W, rtol=1e-3)


def test_relative_weights_are_the_stated_multiples():
    """scale="relative" is the absolute solve with alpha, mu times sum z^2 / d_sae and beta, nu times N
    (hand computation from the dense codes)."""
    X, sc, Wp, bp = _problem(22, N=50, d=16)
    Z = sc.to_dense()
    g, n = float((Z ** 2).sum()) / 16, 50
    acc = DecoderAccumulator(16, 5).update(sc, X)
    assert acc.latent_energy() == pytest.approx(g, rel=1e-12)
    assert acc.weights(0.1, 0.2, 0.3, 0.4, scale="relative") == pytest.approx((0.1 * g, 0.2 * n, 0.3 * g, 0.4 * n))
    W, b = solve_decoder(sc, X, 0.1, 0.2, 0.3, 0.4, Wp, bp, scale="relative")
    W_ref, b_ref = _augmented_lstsq(Z, X, 0.1 * g, 0.2 * n, 0.3 * g, 0.4 * n, Wp, bp)
    torch.testing.assert_close(W, W_ref, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(b, b_ref, rtol=1e-8, atol=1e-9)
    with pytest.raises(ConfigError, match="scale"):
        acc.solve(scale="percent")


def test_trainer_decoder_step_is_scale_equivariant():
    """The PAM trainer's own decoder step: data s X and an encoder with b_enc scaled by s give codes s Z
    (TopK picks the same latents); with the bias anchor s b_dec the step returns the same W_dec and s b_dec."""
    import splinterp as sp
    from splinterp.train import PAMConfig
    from splinterp.train.pam import PAMTrainer

    s = 3.0
    g = torch.Generator().manual_seed(3)
    X = torch.randn(48, 10, generator=g) + 0.5  # 48 rows, 64 latents
    out = []
    for scale in (1.0, s):
        sae = sp.make_sae(10, 64, "topk", 4, seed=5)
        with torch.no_grad():
            sae.b_enc.copy_(scale * 0.1 * torch.randn(64, generator=torch.Generator().manual_seed(6)))
            sae.b_dec.copy_(scale * torch.linspace(-1, 1, 10))
        trainer = PAMTrainer(sae, scale * X, PAMConfig(progress=False))
        trainer.solve_decoder()
        out.append((sae.W_dec.detach().clone(), sae.b_dec.detach().clone()))
    (W1, b1), (W2, b2) = out
    torch.testing.assert_close(W2, W1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b2, s * b1, rtol=1e-4, atol=1e-5)
