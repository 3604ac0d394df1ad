"""splinterp.train.compare (one SAE trained by a named method from a shared initialisation) and
splinterp.claims (mean ± CI cells and verdicts)."""

from __future__ import annotations

import math

import pytest
import torch

from splinterp.claims import cell, combine_verdicts, format_cell, markdown_table, verdict
from splinterp.errors import ConfigError
from splinterp.train.compare import METHODS, make_sae, train_method


def _data(n=96, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(40, d, generator=g)


def test_same_seed_same_initial_weights_for_every_method():
    a, b = make_sae(12, 8, "topk", k=2, seed=3), make_sae(12, 8, "topk", k=2, seed=3)
    assert torch.equal(a.W_enc, b.W_enc) and torch.equal(a.W_dec, b.W_dec)
    c = make_sae(12, 8, "topk", k=2, seed=4)
    assert not torch.equal(a.W_enc, c.W_enc)
    au = make_sae(12, 8, "topk", k=2, seed=3, init="authors")
    assert not au.b_enc.any() and not au.b_dec.any()
    with pytest.raises(ConfigError, match="init"):
        make_sae(12, 8, "topk", k=2, init="xavier")


@pytest.mark.parametrize("method", METHODS)
def test_record_metrics_are_the_plain_mse_measured_after_training(method):
    X, Xt = _data()
    rec, sae = train_method(make_sae(12, 8, "topk", k=2, seed=1), method, X, Xt, epochs=2, batch_size=32,
                            lr=1e-2, seed=1, curves=True)
    with torch.no_grad():  # by hand: mean over all elements of (x - x_hat)^2, no penalty
        tr = float(((X.double() - sae(X).double()) ** 2).mean())
        te = float(((Xt.double() - sae(Xt).double()) ** 2).mean())
    assert rec["train_mse"] == pytest.approx(tr, rel=1e-5) and rec["test_mse"] == pytest.approx(te, rel=1e-5)
    assert rec["method"] == method and rec["epochs"] == 2 and len(rec["curves"]["test_mse"]) == 2
    assert rec["steps"] == 2 * math.ceil(96 / 32)


def test_methods_differ_and_bad_method_is_refused():
    X, Xt = _data()
    finals = {m: train_method(make_sae(12, 8, "topk", k=2, seed=1), m, X, Xt, epochs=1, batch_size=32, lr=1e-2,
                              seed=1)[0]["test_mse"] for m in METHODS}
    assert len(set(finals.values())) == 3
    with pytest.raises(ConfigError, match="method"):
        train_method(make_sae(12, 8, "topk", k=2), "adam", X, Xt, epochs=1, batch_size=32, lr=1e-2, seed=0)


def test_cell_and_verdict_follow_the_student_t_rule():
    # 5 values, mean 1, sd 1 (hand): half-width t(0.975, 4) sd / sqrt(5) = 2.7764 / 2.2361 = 1.2417
    c = cell([0.0, 1.0, 2.0, 0.0, 2.0])
    sd = math.sqrt((1 + 0 + 1 + 1 + 1) / 4)
    assert c["mean"] == 1.0 and c["n"] == 5
    assert c["half_width"] == pytest.approx(2.776445 * sd / math.sqrt(5), rel=1e-6)
    assert verdict(c, "positive") == "inconclusive"  # CI [-0.24, 2.24] contains 0 (half-width 1.24 > 1)
    hi = cell([2.0, 2.1, 1.9, 2.0, 2.05])
    assert verdict(hi, "positive") == "holds" and verdict(hi, "negative") == "does not hold"
    one = cell([0.5])
    assert one["half_width"] is None and verdict(one, "negative") == "inconclusive (1 seed)"
    assert format_cell(one) == "0.5 (1 seed)" and format_cell(None) == "–"
    assert format_cell(cell([1.0, 3.0])).endswith("(2 seeds)") and "±" in format_cell(cell([1.0, 3.0]))
    with pytest.raises(ConfigError):
        verdict(hi, "up")


def test_combine_verdicts():
    assert combine_verdicts({"a": "holds", "b": "holds"}) == "holds"
    assert combine_verdicts({"a": "holds", "b": "inconclusive"}) == "holds only with a"
    assert combine_verdicts({"a": "does not hold", "b": "does not hold"}) == "does not hold"
    assert combine_verdicts({"a": "does not hold", "b": "inconclusive"}) == "inconclusive"
    with pytest.raises(ConfigError):
        combine_verdicts({})


def test_markdown_table_escapes_pipes():
    assert markdown_table(["a", "b"], [["x|y", 1]]) == "| a | b |\n|---|---|\n| x\\|y | 1 |\n"
