"""`splinterp slice`: the exact slice figure (PNG + offline HTML) of any SAE folder, ours and one written by the real
SAELens; the regions it draws are counted against the brute-force 1 + L + I of the latent lines on the plane."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from line_arrangement import brute_force_arrangement_count
from test_viz_html import figure_data

import splinterp
from splinterp.cli import main
from splinterp.geometry import plane_through


def arrangement_count(W: np.ndarray, b: np.ndarray, origin: np.ndarray, plane, bounds) -> int:
    """1 + L + I of the lines {x(a, b) @ W + b = 0} in the box (general position), x = origin + a u + b v."""
    return brute_force_arrangement_count(np.stack([plane.u.numpy() @ W, plane.v.numpy() @ W]), origin @ W + b, bounds)


def _data(tmp_path, d: int, n: int = 120, dtype=np.float32):
    X = np.random.default_rng(3).normal(size=(n, d)).astype(dtype) * 2
    np.save(tmp_path / "x.npy", X)
    return X


def _regions_drawn(page) -> int:
    return sum(t.get("fill") == "toself" for t in figure_data(page))


def test_slice_of_our_relu_sae_draws_every_region(tmp_path, capsys):
    sae = splinterp.SAE(splinterp.SAEConfig(d_in=7, d_sae=20, architecture="relu", seed=0))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    splinterp.save(sae, tmp_path / "sae")
    X = _data(tmp_path, 7)
    out = tmp_path / "fig" / "s"
    assert main(["slice", str(tmp_path / "sae"), "--data", str(tmp_path / "x.npy"), "--through", "3", "8", "11",
                 "--out", str(out)]) == 0
    assert (tmp_path / "fig" / "s.png").stat().st_size > 10_000 and (tmp_path / "fig" / "plotly.min.js").is_file()
    plane = plane_through(*(torch.from_numpy(X[i]) for i in (3, 8, 11)))
    W = sae.W_enc.detach().double().numpy()
    want = arrangement_count(W, sae.b_enc.detach().double().numpy(), plane.origin.numpy(), plane, plane.bounds(0.25))
    assert _regions_drawn(tmp_path / "fig" / "s.html") == want
    assert f"{want} regions (exact)" in capsys.readouterr().out
    assert main(["slice", str(tmp_path / "sae"), "--data", str(tmp_path / "x.npy"), "--pca", "--out",
                 str(tmp_path / "p"), "--plotlyjs", "inline"]) == 0
    page = (tmp_path / "p.html").read_text()
    assert not re.search(r'<script[^>]*src="https?://', page) and _regions_drawn(tmp_path / "p.html") > 1


def test_slice_of_a_saelens_folder(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saelens = pytest.importorskip("sae_lens", reason="sae-lens is in [dev]")
    ref = saelens.StandardSAE(saelens.StandardSAEConfig(d_in=8, d_sae=16, dtype="float32",
                                                        apply_b_dec_to_input=True))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    ref.save_model(tmp_path / "lens")
    X = _data(tmp_path, 8)
    assert main(["slice", str(tmp_path / "lens"), "--data", str(tmp_path / "x.npy"), "--through", "0", "1", "2",
                 "--out", str(tmp_path / "s")]) == 0
    plane = plane_through(*(torch.from_numpy(X[i]) for i in (0, 1, 2)))
    # SAELens' own weights: scores (x - b_dec) W_enc + b_enc
    W = ref.W_enc.detach().double().numpy()
    b = ref.b_enc.detach().double().numpy() - ref.b_dec.detach().double().numpy() @ W
    want = arrangement_count(W, b, plane.origin.numpy(), plane, plane.bounds(0.25))
    assert _regions_drawn(tmp_path / "s.html") == want


def test_slice_bad_args(tmp_path, capsys):
    splinterp.save(splinterp.SAE(splinterp.SAEConfig(d_in=5, d_sae=8, architecture="relu", seed=0)), tmp_path / "sae")
    _data(tmp_path, 5, n=10)
    base = ["slice", str(tmp_path / "sae"), "--data", str(tmp_path / "x.npy")]
    cases = [([], "not neither"), (["--pca", "--through", "0", "1", "2"], "not both"),
             (["--through", "0", "1"], "three distinct row indices"), (["--through", "0", "1", "1"], "distinct"),
             (["--through", "0", "1", "10"], "only 10 rows"), (["--pca", "--out", "x.png"], "without extension"),
             (["--pca", "--margin", "-1"], "--margin")]
    for extra, msg in cases:
        assert main([*base, *extra]) == 2, extra
        assert msg in capsys.readouterr().err, (extra, msg)
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.html"))  # nothing half-written
