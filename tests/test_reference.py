"""Reference autoencoders: hand-computed fits, brute-force assignments, sklearn parity, k-flats monotonicity."""

import numpy as np
import pytest
import torch

from splinterp.errors import ConfigError, DTypeError, NonFiniteError, NotFittedError, ShapeError
from splinterp.reference import PCAAE, KMeansAE, LocalPCAAE
from splinterp.reference._base import kmeans_plusplus, top_directions

pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(n_per=40, centres=((0, 0, 0), (6, 0, 1), (0, 7, -2)), scale=0.5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    C = torch.tensor(centres, dtype=torch.float64)
    y = torch.arange(len(centres)).repeat_interleave(n_per)
    X = C[y] + scale * torch.randn(len(y), C.shape[1], generator=g, dtype=torch.float64)
    return X.to(dtype), y


def lines(m=3, n_per=30, d=3, seed=0, noise=0.0):
    """Points on m well-separated affine lines in R^d (plus optional noise)."""
    g = torch.Generator().manual_seed(seed)
    X, y = [], []
    for j in range(m):
        mu = 10.0 * torch.randn(d, generator=g, dtype=torch.float64)
        u = torch.randn(d, generator=g, dtype=torch.float64)
        t = torch.linspace(-1, 1, n_per, dtype=torch.float64)[:, None]
        X.append(mu + t * u / u.norm() + noise * torch.randn(n_per, d, generator=g, dtype=torch.float64))
        y.append(torch.full((n_per,), j))
    return torch.cat(X), torch.cat(y)


def same_partition(a, b) -> bool:
    """Labels equal up to a renaming of the clusters."""
    a, b = np.asarray(a), np.asarray(b)
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# ---------------------------------------------------------------------- k-means
def test_kmeans_hand_computed():
    X = torch.tensor([[0.0], [1.0], [10.0], [11.0]], dtype=torch.float64)
    km = KMeansAE(2, n_init=3, seed=0).fit(X)
    centres = sorted(km.cluster_centers_.flatten().tolist())
    assert centres == pytest.approx([0.5, 10.5])
    assert km.inertia_ == pytest.approx(4 * 0.25)
    assert km.score(X) == pytest.approx(0.25)  # mse = inertia / (N * d)
    Z = km.encode(X)
    assert Z.shape == (4, 2) and torch.equal(Z.sum(1), torch.ones(4, dtype=X.dtype))
    assert torch.equal(km.transform(X), Z)
    assert torch.allclose(km.decode(Z), km.cluster_centers_[km.regions(X)])
    assert torch.allclose(km.forward(X), km.inverse_transform(Z))
    assert km.regions(X).dtype == torch.int64
    assert km.regions(X)[0] == km.regions(X)[1] != km.regions(X)[2] == km.regions(X)[3]
    assert km.n_parameters() == 2 * 1
    assert km.W_dec.shape == (2, 1) and torch.equal(km.b_dec, torch.zeros(1, dtype=X.dtype))


def test_kmeans_encode_is_brute_force_nearest_centroid():
    X, _ = blobs(seed=1)
    km = KMeansAE(5, n_init=2, seed=3).fit(X)
    Xq = torch.randn(200, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 5
    brute = torch.cdist(Xq, km.cluster_centers_).argmin(1)
    assert torch.equal(km.regions(Xq), brute)
    Z = km.encode(Xq)
    assert torch.equal(Z.argmax(1), brute) and set(Z.unique().tolist()) == {0.0, 1.0}
    # labels_/inertia_ describe the final centres on the training data
    assert torch.equal(km.labels_, torch.cdist(X, km.cluster_centers_).argmin(1))
    d2 = ((X - km.cluster_centers_[km.labels_]) ** 2).sum()
    assert km.inertia_ == pytest.approx(float(d2), rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_objective_no_worse_than_sklearn(seed):
    from sklearn.cluster import KMeans

    X, y = blobs(n_per=50, centres=((0, 0), (4, 0), (0, 4), (4, 4.5)), scale=0.8, seed=seed, dtype=torch.float32)
    km = KMeansAE(4, n_init=10, max_iter=300, seed=seed).fit(X)
    sk = KMeans(4, n_init=10, max_iter=300, random_state=seed).fit(X.numpy())
    X64 = X.double()

    def inertia(C):
        return float(torch.cdist(X64, torch.as_tensor(np.asarray(C)).double()).pow(2).min(1).values.sum())

    assert inertia(km.cluster_centers_) <= inertia(sk.cluster_centers_) * (1 + 1e-5)
    assert same_partition(km.labels_, sk.labels_)


def test_kmeans_deterministic_and_chunk_independent():
    X, _ = blobs(seed=2)
    a = KMeansAE(6, n_init=4, seed=11).fit(X)
    b = KMeansAE(6, n_init=4, seed=11).fit(X)
    c = KMeansAE(6, n_init=4, seed=11, chunk_size=7).fit(X)
    assert torch.equal(a.cluster_centers_, b.cluster_centers_)
    assert torch.allclose(a.cluster_centers_, c.cluster_centers_, atol=1e-12)
    assert torch.equal(a.labels_, c.labels_)


def test_kmeans_random_init_and_k_equals_n():
    X, _ = blobs(n_per=3)
    km = KMeansAE(9, n_init=2, init="random", seed=0).fit(X)  # every point its own centroid
    assert km.inertia_ == pytest.approx(0.0, abs=1e-12)
    assert sorted(km.labels_.tolist()) == list(range(9))


def test_kmeans_empty_cluster_reseeded_at_farthest_point():
    X = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [5.2, 0.0], [9.0, 0.0]], dtype=torch.float64)
    init = torch.tensor([[0.0, 0.0], [5.0, 0.0], [100.0, 100.0]], dtype=torch.float64)  # 3rd gets no point
    km = KMeansAE(3, seed=0).fit(X, init=init)
    counts = torch.bincount(km.labels_, minlength=3)
    assert (counts > 0).all()
    # first step: clusters {0, 0.1}, {5, 5.2, 9}; the farthest point from its centre is 9 -> its own cluster
    assert sorted(km.cluster_centers_[:, 0].tolist()) == pytest.approx([0.05, 5.1, 9.0])
    assert km.inertia_ == pytest.approx(2 * 0.05**2 + 2 * 0.1**2)


def test_hartigan_refine_escapes_a_lloyd_fixed_point():
    # {-1, 1 | 2.9} is Lloyd-stable (1 is nearer 0 than 2.9) with SSE 2; moving 1 to the other cluster
    # gives {-1 | 1, 2.9}: SSE 2 * 0.95^2 = 1.805 (Hartigan: remove 2/1 * 1 > add 1/2 * 1.9^2)
    X = torch.tensor([[-1.0], [1.0], [2.9]], dtype=torch.float64)
    init = torch.tensor([[0.0], [2.9]], dtype=torch.float64)
    lloyd = KMeansAE(2, refine=False).fit(X, init=init)
    assert lloyd.inertia_ == pytest.approx(2.0)
    polished = KMeansAE(2, refine=True).fit(X, init=init)
    assert polished.inertia_ == pytest.approx(1.805)
    assert sorted(polished.cluster_centers_.flatten().tolist()) == pytest.approx([-1.0, 1.95])
    assert polished.n_refine_rounds_ >= 1


def test_refine_never_worse_than_lloyd():
    X, _ = blobs(n_per=40, centres=((0, 0), (2, 0), (0, 2), (2, 2), (1, 1)), scale=0.9, seed=3)
    for seed in range(3):
        a = KMeansAE(7, n_init=2, seed=seed, refine=False).fit(X)
        b = KMeansAE(7, n_init=2, seed=seed, refine=True).fit(X)
        assert b.inertia_ <= a.inertia_ * (1 + 1e-12)
        assert torch.equal(b.labels_, torch.cdist(X, b.cluster_centers_).argmin(1))


def test_kmeans_plusplus_picks_distinct_far_points():
    # two far-apart pairs: D^2 sampling must put the second centre in the other pair
    X = torch.tensor([[0.0, 0.0], [0.0, 0.01], [100.0, 0.0], [100.0, 0.01]], dtype=torch.float64)
    Xc = X - X.mean(0)
    C = kmeans_plusplus(Xc, (Xc * Xc).sum(1), 2, 8, torch.Generator().manual_seed(0))
    assert C.shape == (8, 2, 2)
    assert ((C[:, 0, 0] - C[:, 1, 0]).abs() == 100).all()


def test_kmeans_input_errors():
    X, _ = blobs()
    km = KMeansAE(3)
    with pytest.raises(NotFittedError):
        km.encode(X)
    bad = X.clone()
    bad[5, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="row 5"):
        km.fit(bad)
    with pytest.raises(DTypeError):
        km.fit(X.long())
    with pytest.raises(ConfigError):
        KMeansAE(500).fit(X)
    with pytest.raises(ConfigError):
        KMeansAE(0)
    with pytest.raises(ConfigError):
        KMeansAE(3, init="bogus")
    km.fit(X)
    with pytest.raises(ShapeError):
        km.encode(X[:, :2])
    with pytest.raises(DTypeError):
        km.encode(X.float())
    with pytest.raises(ShapeError):
        km.decode(torch.zeros(4, 5, dtype=X.dtype))
    with pytest.raises(ShapeError):
        km.fit(X, init=torch.zeros(2, 3, dtype=X.dtype))


def test_kmeans_accepts_numpy():
    X, _ = blobs()
    km = KMeansAE(3, seed=0).fit(X.numpy())
    assert km.dtype == torch.float64
    assert torch.equal(km.regions(X.numpy()), km.labels_)


# ---------------------------------------------------------------------- local PCA (k-flats)
def brute_flat_errors(model, X):
    """|(I - U U^T)(x - mu)|^2 for every region, by a loop over regions."""
    cols = []
    for j in range(model.n_regions):
        D = X - model.means_[j]
        U = model.bases_[j]
        R = D - (D @ U) @ U.T
        cols.append((R * R).sum(1))
    return torch.stack(cols, 1)


def test_local_pca_objective_never_increases():
    X, _ = lines(m=4, n_per=40, d=4, seed=3, noise=0.3)
    X = X + torch.randn(X.shape, generator=torch.Generator().manual_seed(9), dtype=X.dtype)  # overlapping
    lp = LocalPCAAE(4, 2, max_iter=50, tol=0.0, seed=1, kmeans_n_init=1).fit(X)
    h = np.array(lp.objective_history_)
    assert len(h) >= 3
    assert np.all(np.diff(h) <= 1e-9 * h[:-1])
    assert h[0] > h[-1]
    assert lp.objective_ == pytest.approx(h[-1])
    assert lp.score(X) * X.numel() == pytest.approx(lp.objective_, rel=1e-9)


def test_local_pca_assignment_and_flats_are_brute_force_optimal():
    X, _ = lines(m=3, n_per=25, d=3, seed=0, noise=0.4)
    lp = LocalPCAAE(3, 1, seed=0).fit(X)
    E = brute_flat_errors(lp, X)
    assert torch.equal(lp.regions(X), E.argmin(1))
    # fixed regions: mean + top-1 direction of each region's own points (numpy SVD)
    for j in range(3):
        P = X[lp.labels_ == j].numpy()
        mu = P.mean(0)
        _, _, Vt = np.linalg.svd(P - mu, full_matrices=False)
        np.testing.assert_allclose(lp.means_[j].numpy(), mu, atol=1e-10)
        proj = np.outer(Vt[0], Vt[0])
        U = lp.bases_[j].numpy()
        np.testing.assert_allclose(U @ U.T, proj, atol=1e-8)


def test_local_pca_recovers_lines_exactly():
    X, y = lines(m=3, n_per=20, d=5, seed=4)
    lp = LocalPCAAE(3, 1, seed=0).fit(X)
    assert lp.objective_ == pytest.approx(0.0, abs=1e-12)
    assert same_partition(lp.labels_, y)
    assert torch.allclose(lp.forward(X), X, atol=1e-10)


def test_local_pca_rank0_is_kmeans_from_same_init():
    X, _ = blobs(n_per=30, centres=((0, 0), (3, 0), (0, 3), (3, 3)), scale=1.0, seed=5)
    init = X[[0, 1, 2, 3]].clone()  # a poor init, so several Lloyd steps are taken
    km = KMeansAE(4, tol=0.0, seed=0, refine=False).fit(X, init=init)
    lp = LocalPCAAE(4, 0, tol=0.0, seed=0).fit(X, init=init)
    assert torch.equal(km.labels_, lp.labels_)
    assert lp.objective_ == pytest.approx(km.inertia_, rel=1e-12)
    assert torch.allclose(lp.means_, km.cluster_centers_, atol=1e-12)
    assert torch.equal(lp.encode(X), km.encode(X))  # rank-0 code = the k-means one-hot code
    assert len(lp.objective_history_) > 2


def test_local_pca_default_init_starts_at_kmeans():
    X, _ = blobs(seed=6)
    km = KMeansAE(3, n_init=10, seed=0).fit(X)
    lp = LocalPCAAE(3, 1, seed=0).fit(X)
    assert lp.objective_history_[0] == pytest.approx(km.inertia_, rel=1e-9)
    assert lp.objective_ <= km.inertia_


def test_local_pca_code_layout_and_decode():
    X, _ = lines(m=3, n_per=20, d=4, seed=1, noise=0.2)
    lp = LocalPCAAE(3, 2, seed=0).fit(X)
    Z = lp.encode(X)
    assert Z.shape == (60, 3 * 3) and lp.d_sae == 9
    blocks = Z.view(60, 3, 3)
    lab = lp.regions(X)
    assert torch.equal(blocks[:, :, 0], torch.nn.functional.one_hot(lab, 3).to(Z.dtype))
    off = torch.ones(60, 3, dtype=torch.bool)
    off[torch.arange(60), lab] = False
    assert (blocks[off] == 0).all()
    U = lp.bases_[lab]
    coef = torch.einsum("nd,ndr->nr", X - lp.means_[lab], U)
    assert torch.allclose(blocks[torch.arange(60), lab, 1:], coef, atol=1e-10)
    assert torch.equal(lp.regions_from_code(Z), lab)
    x_hat = lp.means_[lab] + torch.einsum("nr,ndr->nd", coef, U)
    assert torch.allclose(lp.decode(Z), x_hat, atol=1e-10)
    assert torch.allclose(lp.forward(X), x_hat, atol=1e-10)
    assert lp.n_parameters() == 3 * 4 * (1 + 2)


def test_local_pca_region_with_fewer_points_than_rank():
    X, _ = lines(m=2, n_per=30, d=4, seed=2, noise=0.1)
    far = torch.tensor([[200.0, 0, 0, 0], [200.0, 1.0, 0, 0]], dtype=torch.float64)  # a 2-point region
    X = torch.cat([X, far])
    lp = LocalPCAAE(3, 2, seed=0).fit(X)
    j = int(lp.regions(far)[0])
    assert (lp.regions(far) == j).all()
    assert int(lp.region_ranks_[j]) == 1  # affine hull of 2 points is a line
    assert torch.isfinite(lp.bases_).all()
    assert torch.allclose(lp.forward(far), far, atol=1e-10)
    assert torch.equal(lp.regions_from_code(lp.encode(far)), lp.regions(far))


def test_local_pca_single_point_region_code_still_decodes():
    X = torch.tensor([[0.0, 0.0], [1.0, 0.1], [2.0, -0.1], [50.0, 50.0]], dtype=torch.float64)
    lp = LocalPCAAE(2, 1, seed=0).fit(X)
    Z = lp.encode(X[3:])  # coefficient block is all zero; the indicator still names the region
    assert torch.allclose(lp.decode(Z), X[3:])


def test_local_pca_errors():
    X, _ = blobs()
    with pytest.raises(ConfigError):
        LocalPCAAE(3, 4).fit(X)  # rank > d
    with pytest.raises(ConfigError):
        LocalPCAAE(3, -1)
    with pytest.raises(NotFittedError):
        LocalPCAAE(3, 1).regions(X)


# ---------------------------------------------------------------------- PCA
def test_pca_matches_sklearn_and_local_pca_with_one_region():
    from sklearn.decomposition import PCA

    X, _ = blobs(seed=7)
    p = PCAAE(2).fit(X)
    sk = PCA(2).fit(X.numpy())
    np.testing.assert_allclose(np.abs(p.components_.numpy()), np.abs(sk.components_), atol=1e-10)
    np.testing.assert_allclose(p.explained_variance_.numpy(), sk.explained_variance_, rtol=1e-10)
    np.testing.assert_allclose(p.forward(X).numpy(), sk.inverse_transform(sk.transform(X.numpy())), atol=1e-10)
    one = LocalPCAAE(1, 2).fit(X)
    assert torch.allclose(one.forward(X), p.forward(X), atol=1e-10)
    assert torch.equal(p.regions(X), torch.zeros(len(X), dtype=torch.long))
    assert p.n_parameters() == 3 * 3
    assert torch.allclose(p.decode(p.encode(X)), p.forward(X))


def test_pca_hand_computed_line():
    X = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], dtype=torch.float64)
    p = PCAAE(1).fit(X)
    r = 2**-0.5
    assert p.components_[0].tolist() == pytest.approx([r, r])
    assert p.mean_.tolist() == pytest.approx([2.0, 2.0])
    assert p.encode(X)[:, 0].tolist() == pytest.approx([-(2**0.5), 0.0, 2**0.5])
    assert p.score(X) == pytest.approx(0.0, abs=1e-24)
    assert p.explained_variance_.tolist() == pytest.approx([2.0])  # sum of squared scores / (N - 1)


def test_top_directions_rank_deficient_gives_zero_columns():
    Y = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], dtype=torch.float64)
    U, s = top_directions(Y, 2)
    assert U[:, 1].abs().sum() == 0 and s[1] == 0
    assert U[:, 0].tolist() == [1.0, 0.0, 0.0] and s[0] == pytest.approx(2**0.5)
    Yt = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # n >= d branch
    Yt -= Yt.mean(0)
    U2, s2 = top_directions(Yt, 3)
    assert torch.allclose(U2.T @ U2, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(s2, torch.linalg.svdvals(Yt), atol=1e-10)


# ---------------------------------------------------------------------- shared API
@pytest.mark.parametrize("make", [lambda: KMeansAE(3, seed=0), lambda: LocalPCAAE(3, 1, seed=0), lambda: PCAAE(2)])
def test_metrics_evaluate_runs_on_reference_models(make):
    from splinterp import metrics
    X, _ = blobs(dtype=torch.float32)
    model = make().fit(X)
    out = metrics.evaluate(model, X)
    assert out["mse"] == pytest.approx(model.score(X), rel=1e-5)


def test_module_conversions_keep_device_and_dtype_in_step():
    X, _ = blobs()
    km = KMeansAE(3, seed=0).fit(X)
    km32 = km.float()
    assert km32.dtype == torch.float32 and km32.device == torch.device("cpu")
    assert torch.equal(km32.regions(X.float()), km.labels_)
    with pytest.raises(DTypeError):
        km32.encode(X)


# ------------------------------------------------------------------------------------------ state_dict
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_state_dict_round_trip_into_an_unfitted_model(tmp_path, dtype):
    """torch.save(model.state_dict()) -> a new, unfitted model of the same settings -> the same model."""
    from splinterp.reference import PCAAE, KMeansAE, LocalPCAAE

    X = torch.randn(300, 6, generator=torch.Generator().manual_seed(0), dtype=dtype)
    for cls, kw in ((KMeansAE, dict(n_clusters=4, n_init=2)), (LocalPCAAE, dict(n_regions=3, rank=2)),
                    (PCAAE, dict(rank=2))):
        a = cls(**kw).fit(X)
        torch.save(a.state_dict(), tmp_path / "m.pt")
        b = cls(**kw)
        b.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
        assert (b.d_in, b.dtype) == (6, dtype)
        assert torch.equal(b(X), a(X)) and torch.equal(b.encode(X), a.encode(X)), cls.__name__
        for attr in cls._FIT_ATTRS:
            assert getattr(b, attr) == getattr(a, attr), attr
        other = dict(kw, **{next(iter(kw)): 5}) if cls is not PCAAE else dict(rank=3)
        with pytest.raises(ConfigError, match="settings"):
            cls(**other).load_state_dict(a.state_dict())
    assert list(PCAAE(rank=2).state_dict()) == ["_extra_state"]  # unfitted: nothing but the flag


def test_state_dict_that_is_not_a_reference_ae_is_refused():
    from splinterp.errors import CorruptFileError
    from splinterp.reference import KMeansAE

    with pytest.raises(CorruptFileError, match="extra state"):
        KMeansAE(n_clusters=2).load_state_dict({"_extra_state": 5})
    with pytest.raises(CorruptFileError, match="lacks"):  # says fitted, holds no centres
        KMeansAE(n_clusters=2).load_state_dict({"_extra_state": {"fitted": True, "d_in": 3}}, strict=False)


# ---------------------------------------------------------------------- scale: the objectives are scale-free
def brute_force_flat_errors(X, means, bases):
    """float64 squared error of every point on every flat mu_j + span(U_j): [N, m] (no expansion)."""
    X, means, bases = X.double(), means.double(), bases.double()
    D = X[:, None, :] - means[None]  # [N, m, d]
    proj = torch.einsum("nmd,mdr->nmr", D, bases)
    return (D * D).sum(2) - (proj * proj).sum(2)


@pytest.mark.parametrize("scale, dtype", [(1e19, torch.float32), (1e30, torch.float32), (1e-30, torch.float32),
                                          (1e150, torch.float64), (1e-200, torch.float64)])
def test_kmeans_is_scale_free(scale, dtype):
    """`KMeansAE(3).fit(torch.randn(100, 6) * 1e19)` used to die in k-means++ (invalid multinomial distribution)."""
    X0, y = blobs(dtype=torch.float64)
    X = (X0 * scale).to(dtype)
    km = KMeansAE(3, n_init=2).fit(X)
    assert same_partition(km.labels_, y)
    # brute force in float64 (values rescaled by hand so the squares fit): labels are the nearest centroids,
    # inertia is the sum of squared distances to them
    s = float(X.double().abs().max())
    Xs, Cs = X.double() / s, km.cluster_centers_.double() / s
    d2 = ((Xs[:, None, :] - Cs[None]) ** 2).sum(2)
    assert torch.equal(d2.argmin(1), km.labels_) and torch.equal(km.encode(X).argmax(1), km.labels_)
    assert km.inertia_ == pytest.approx(float(d2.min(1).values.sum()) * s * s, rel=1e-4)
    # and the fit is the unscaled fit, scaled
    ref = KMeansAE(3, n_init=2).fit(X0.to(dtype))
    assert same_partition(km.labels_, ref.labels_)
    torch.testing.assert_close(km.cluster_centers_.double() / scale, ref.cluster_centers_.double(), rtol=1e-5,
                               atol=1e-6)


def test_the_issue_reproducers_fit():
    X = torch.randn(100, 6, generator=torch.Generator().manual_seed(0))
    for scale in (1e19, 1e30):
        km = KMeansAE(3).fit(X * scale)
        ref = KMeansAE(3).fit(X)
        assert km.inertia_ == pytest.approx(ref.inertia_ * scale**2, rel=1e-4)
        lp = LocalPCAAE(3, 1).fit(X * scale)
        assert lp.objective_ == pytest.approx(LocalPCAAE(3, 1).fit(X).objective_ * scale**2, rel=1e-4)


def test_power_of_two_scaling_changes_no_bit():
    """Fits on X * 2^k are the fits on X times 2^k exactly (labels, centres, inertia), down to the last bit."""
    X, _ = blobs(dtype=torch.float32, seed=3)
    a, b = KMeansAE(3, n_init=2).fit(X), KMeansAE(3, n_init=2).fit(X * 2.0**70)
    assert torch.equal(a.labels_, b.labels_) and torch.equal(a.cluster_centers_ * 2.0**70, b.cluster_centers_)
    assert a.inertia_ * 2.0**140 == b.inertia_
    p, q = LocalPCAAE(3, 1).fit(X), LocalPCAAE(3, 1).fit(X * 2.0**-90)
    assert torch.equal(p.labels_, q.labels_) and torch.equal(p.means_ * 2.0**-90, q.means_)
    assert torch.equal(p.bases_, q.bases_)
    assert torch.equal(p.encode(X)[:, 1::2] * 2.0**-90, q.encode(X * 2.0**-90)[:, 1::2])  # the coefficients


@pytest.mark.parametrize("scale, dtype", [(1e19, torch.float32), (1e-30, torch.float32), (1e150, torch.float64)])
def test_local_pca_is_scale_free(scale, dtype):
    X0, y = lines(noise=0.01)
    X = (X0 * scale).to(dtype)
    lp = LocalPCAAE(3, 1, kmeans_n_init=3).fit(X)
    s = float(X.double().abs().max())
    err = brute_force_flat_errors(X.double() / s, lp.means_.double() / s, lp.bases_)
    assert torch.equal(err.argmin(1), lp.labels_) and torch.equal(lp.regions(X), lp.labels_)
    assert lp.objective_ == pytest.approx(float(err.min(1).values.sum()) * s * s, rel=1e-3)
    # the reconstruction is the projection onto the assigned flat, in X's units
    Xh = lp.forward(X).double() / s
    M, U = lp.means_.double()[lp.labels_] / s, lp.bases_.double()[lp.labels_]
    P = M + torch.einsum("ndr,nr->nd", U, torch.einsum("ndr,nd->nr", U, X.double() / s - M))
    torch.testing.assert_close(Xh, P, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scale, dtype", [(1e19, torch.float32), (1e200, torch.float64)])
def test_pca_is_scale_free(scale, dtype):
    X0, _ = lines(m=1, noise=0.1)
    X = (X0 * scale).to(dtype)
    pc = PCAAE(2).fit(X)
    ref = PCAAE(2).fit(X0)
    torch.testing.assert_close(pc.components_.double(), ref.components_, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pc.singular_values_.double() / scale, ref.singular_values_, rtol=1e-4, atol=0)
    assert torch.isfinite(pc.encode(X)).all()


def test_an_objective_beyond_float64_is_inf_and_the_model_still_right():
    X0, y = blobs()
    km = KMeansAE(3, n_init=2).fit(X0 * 1e200)  # squared distances ~1e400: the inertia cannot be a float64
    assert km.inertia_ == float("inf") and same_partition(km.labels_, y)
    torch.testing.assert_close(km.cluster_centers_ / 1e200, KMeansAE(3, n_init=2).fit(X0).cluster_centers_)


def test_encoding_data_far_beyond_the_fit_names_the_row():
    X, _ = blobs(dtype=torch.float32)
    km, lp = KMeansAE(3).fit(X), LocalPCAAE(3, 1).fit(X)
    far = X[:5].clone()
    far[3] *= 1e30  # its squared distance overflows float32 at the model's scale
    for model, what in ((km, "centroids"), (lp, "region means")):
        with pytest.raises(NonFiniteError, match=f"X row 3 is so far from the {what}"):
            model.encode(far)
    far64 = far.double()
    assert km.double().encode(far64)[3].sum() == 1  # the named way out: float64 is enough here


@pytest.mark.parametrize("make", [lambda **kw: KMeansAE(2, **kw), lambda **kw: LocalPCAAE(2, 1, **kw),
                                  lambda **kw: PCAAE(1, **kw)])
@pytest.mark.parametrize("kw, field", [({"seed": 1.5}, "seed"), ({"device": "tpu"}, "device"),
                                       ({"device": "cuda:99"}, "device"), ({"chunk_size": "8"}, "chunk_size")])
def test_settings_of_the_wrong_kind_are_named(make, kw, field):
    """seed=1.5 used to reach torch's manual_seed, device="tpu" torch's device parser (raw RuntimeErrors)."""
    with pytest.raises(ConfigError, match=field):
        make(**kw)


@pytest.mark.parametrize("kw, field", [({"tol": "x"}, "tol"), ({"progress": "yes"}, "progress"),
                                       ({"refine": "x"}, "refine"), ({"tol": float("inf")}, "tol")])
def test_kmeans_settings_are_type_checked(kw, field):
    with pytest.raises(ConfigError, match=field):
        KMeansAE(2, **kw)


def test_a_non_finite_init_is_named():
    X, _ = blobs()
    for model, init in ((KMeansAE(3), X[:3].clone()), (LocalPCAAE(3, 1), X[:3].clone())):
        init[1, 2] = float("nan")
        with pytest.raises(NonFiniteError, match=r"init contains a non-finite value \(nan\) at row 1, column 2"):
            model.fit(X, init=init)


def test_subnormal_data_report_what_the_stored_model_achieves():
    """Data at 2^-149 (float32's smallest subnormal): the fitted mean 2^-150 cannot be stored, so the objective
    must be that of the stored model (found by the fuzz suite: it was half of it)."""
    X = torch.tensor([[2.0**-149], [0.0]])
    for model, value in ((KMeansAE(1).fit(X), "inertia_"), (LocalPCAAE(1, 0).fit(X), "objective_")):
        stored = model.forward(X).double()
        by_hand = float(((X.double() - stored) ** 2).sum())
        assert getattr(model, value) == by_hand == 2.0**-298  # the mean is stored as 0 or 2^-149: error 2^-298
