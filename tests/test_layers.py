"""splinterp.layers: angular distances, complete-linkage grouping, AMAD, groups JSON, group batches, transfer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from splinterp import SAE, SAEConfig
from splinterp.data.cache import Standardizer
from splinterp.data.harvest import write_cache
from splinterp.errors import ConfigError, CorruptFileError, ShapeError
from splinterp.layers import (
    AngularDistanceMatrix,
    FVUTracker,
    GroupBatches,
    LayerDistances,
    all_groupings,
    amad,
    amd_per_group,
    angular_distance,
    check_distance_matrix,
    choose_n_groups,
    cluster_layers,
    layer_distances,
    load_groups,
    save_groups,
    source_layer,
    steps_to_target,
    train_group_sae,
    transfer_direction,
    transfer_init,
)
from splinterp.train import SGDConfig, train_sgd


# ------------------------------------------------------------------------------------------ distances
def test_angular_distance_handmade():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0], [-1.0, -1.0], [1.0, 1.0]])
    # per row: orthogonal 1/2, equal 0, opposite 1, 45 degrees 1/4 (arccos near +-1 is good to ~1e-8)
    assert angular_distance(a, b) == pytest.approx((0.5 + 0.0 + 1.0 + 0.25) / 4, abs=1e-8)
    assert angular_distance(a, a) == pytest.approx(0.0, abs=1e-7)
    assert angular_distance(a, b) == pytest.approx(angular_distance(b, a), abs=1e-15)


def test_angular_distance_zero_vector_and_centering():
    a = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert angular_distance(a, b) == pytest.approx((0.5 + 0.0) / 2)  # zero vector: cosine 0
    # centring by hand: a - mean(a) = [[-.5, 0], [.5, 0]], b - mean(b) = 0 -> cosines 0 -> 1/2 each
    assert angular_distance(a, b, center=True) == pytest.approx(0.5)
    x = torch.tensor([[1.0, 2.0], [3.0, 1.0], [0.0, 4.0]])
    y = torch.tensor([[2.0, 1.0], [1.0, 1.0], [5.0, 0.0]])
    xc, yc = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    want = np.mean([math.acos(float(torch.dot(u, v) / (u.norm() * v.norm()))) / math.pi for u, v in zip(xc, yc)])
    assert angular_distance(x, y, center=True) == pytest.approx(want, abs=1e-8)


def test_angular_distance_bad_input():
    with pytest.raises(ShapeError):
        angular_distance(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ShapeError):
        AngularDistanceMatrix(2).update(torch.zeros(4, 3, 2))


def test_matrix_streaming_equals_one_shot_and_pairs():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 3, 5, generator=g)
    one = AngularDistanceMatrix(3).update(X).value()
    acc = AngularDistanceMatrix(3)
    for s in range(0, 50, 7):
        acc.update(X[s:s + 7])
    np.testing.assert_allclose(acc.value(), one, atol=1e-12)
    assert np.allclose(np.diag(one), 0) and np.allclose(one, one.T)
    for i in range(3):
        for j in range(3):
            if i != j:
                assert one[i, j] == pytest.approx(angular_distance(X[:, i], X[:, j]), abs=1e-12)


def test_layer_distances_cache_equals_tensor(tmp_path):
    g = torch.Generator().manual_seed(1)
    acts = {v: torch.randn(40, 6, generator=g) + v for v in range(4)}
    cache = write_cache(tmp_path / "c", acts, shard_tokens=16)
    stacked = torch.stack([acts[v] for v in range(4)], 1)
    for center in (False, True):
        d_cache = layer_distances(cache, split=None, center=center, batch_size=9)
        d_tensor = layer_distances(stacked, center=center)
        np.testing.assert_allclose(d_cache.matrix, d_tensor.matrix, atol=1e-12)
        assert d_cache.layers == [0, 1, 2, 3] and d_cache.n_tokens == 40 and d_cache.centered == center
    part = layer_distances(cache, [1, 3], split=None, max_tokens=10)
    assert part.n_tokens == 10
    assert part.matrix[0, 1] == pytest.approx(angular_distance(acts[1][:10], acts[3][:10]), abs=1e-12)
    sub = d_tensor.sub([3, 1])
    assert sub.layers == [3, 1] and sub.matrix[0, 1] == d_tensor.matrix[3, 1]
    assert LayerDistances.from_dict(json.loads(json.dumps(d_tensor.to_dict()))).matrix.tolist() == \
        d_tensor.matrix.tolist()


# ------------------------------------------------------------------------------------------ grouping
D4 = np.array([[0.0, 0.1, 0.5, 0.6],
               [0.1, 0.0, 0.45, 0.55],
               [0.5, 0.45, 0.0, 0.2],
               [0.6, 0.55, 0.2, 0.0]])


def test_amad_by_hand():
    assert amad(D4, [0, 0, 0, 0]) == pytest.approx(0.6)
    assert amad(D4, [0, 0, 1, 1]) == pytest.approx((0.1 + 0.2) / 2)
    assert amad(D4, [0, 0, 1, 2]) == pytest.approx((0.1 + 0 + 0) / 3)  # singletons contribute 0
    assert amad(D4, [0, 1, 0, 1]) == pytest.approx((0.5 + 0.55) / 2)
    assert amad(D4, [0, 1, 2, 3]) == 0.0
    assert amd_per_group(D4, [1, 1, 0, 0]) == [0.2, 0.1]  # label order
    assert amad(D4, [0, 1, 1, 0]) == pytest.approx((0.6 + 0.45) / 2)


def test_cluster_layers_handmade():
    assert cluster_layers(D4, 1) == [0, 0, 0, 0]
    assert cluster_layers(D4, 2) == [0, 0, 1, 1]
    assert cluster_layers(D4, 3) == [0, 0, 1, 2]  # {0,1} merge first (0.1), then {2,3} (0.2)
    assert cluster_layers(D4, 4) == [0, 1, 2, 3]
    # complete linkage: 0-1 at 0.1; then {0,1}-2 at max(0.3, 0.35) = 0.35 < 2-3 at 0.4
    D = np.array([[0, .1, .3, .9], [.1, 0, .35, .9], [.3, .35, 0, .4], [.9, .9, .4, 0]])
    assert cluster_layers(D, 2) == [0, 0, 0, 1]
    # single linkage would merge 3 into {2} first at 0.4 ... complete linkage looks at the farthest pair
    with pytest.raises(ConfigError):
        cluster_layers(D4, 0)
    with pytest.raises(ConfigError):
        cluster_layers(D4, 5)


def test_groupings_nested_noncontiguous_and_drop_last():
    D = np.array([[0, .4, .1, .5], [.4, 0, .45, .3], [.1, .45, 0, .5], [.5, .3, .5, 0]])
    gs = all_groupings(D, drop_last=False)
    assert sorted(gs) == [1, 2, 3, 4]
    assert gs[3].groups == [[0, 2], [1], [3]] and not gs[3].contiguous
    assert gs[2].groups == [[0, 2], [1, 3]]
    for g in (1, 2, 3):  # nested partitions: G groups = G+1 groups with two merged
        finer = {tuple(x) for x in gs[g + 1].groups}
        for grp in gs[g].groups:
            assert all(set(f) <= set(grp) or not set(f) & set(grp) for f in finer)
    dropped = all_groupings(D, layers=[10, 11, 12, 13])
    assert sorted(dropped) == [1, 2, 3] and dropped[1].layers == [10, 11, 12]
    assert dropped[2].groups == [[10, 12], [11]]
    assert dropped[2].amad == pytest.approx(0.1 / 2)
    ld = LayerDistances([0, 1, 2, 3], D4, n_tokens=5)
    assert all_groupings(ld, drop_last=False)[2].labels == [0, 0, 1, 1]


def test_choose_n_groups():
    gs = all_groupings(D4, drop_last=False)  # amad: 0.6, 0.15, 0.0333, 0
    assert choose_n_groups(gs, 0.2) == 2
    assert choose_n_groups(gs, 0.05) == 3
    assert choose_n_groups(gs, 1.0) == 1
    assert choose_n_groups({1: 0.5, 2: 0.4}, 0.1) == 2  # none below: the largest G
    with pytest.raises(ConfigError):
        choose_n_groups({}, 0.1)


def test_check_distance_matrix_errors():
    with pytest.raises(ShapeError):
        check_distance_matrix(np.zeros((2, 3)))
    with pytest.raises(ConfigError, match="symmetric"):
        check_distance_matrix(np.array([[0, 1.0], [0.5, 0]]))
    with pytest.raises(ConfigError, match="negative"):
        check_distance_matrix(np.array([[0, -1.0], [-1.0, 0]]))
    with pytest.raises(ConfigError, match="diagonal"):
        check_distance_matrix(np.array([[1.0, 1.0], [1.0, 0]]))
    with pytest.raises(ConfigError, match="non-finite"):
        check_distance_matrix(np.array([[0, np.nan], [np.nan, 0]]))


def test_groups_json_round_trip_and_group_sae_shape(tmp_path):
    gs = all_groupings(D4, layers=[0, 1, 2, 3], drop_last=True)
    p = save_groups(tmp_path / "groups.json", gs, dropped_layers=[3], metadata={"model_name": "m"})
    d = json.loads(p.read_text())
    assert set(k for k in d if k.isdigit()) == {"1", "2", "3"}
    assert d["2"]["labels"] == [0, 0, 1] and d["2"]["amad"] == d["2"]["amd"] == pytest.approx(0.05)
    assert d["layers"] == [0, 1, 2] and d["dropped_layers"] == [3]
    back = load_groups(p)
    assert {g: (v.labels, v.amad) for g, v in back.items()} == {g: (v.labels, v.amad) for g, v in gs.items()}
    # a group-sae file: "amd" only, no layers key
    (tmp_path / "gsae.json").write_text(json.dumps({"1": {"labels": [0, 0], "amd": 0.3},
                                                    "training_clusters": {"x": 1}}))
    assert load_groups(tmp_path / "gsae.json")[1].amad == 0.3
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(CorruptFileError):
        load_groups(tmp_path / "bad.json")


# ------------------------------------------------------------------------------------- group batches
def _acts(n=30, d=4, layers=(0, 1, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    return {v: torch.randn(n, d, generator=g) * (v + 1) + 10 * v for v in layers}


def test_group_batches_uniform_rows_come_from_group_layers():
    acts = _acts()
    gb = GroupBatches(acts, [0, 2], batch_size=7, seed=3)
    rows = torch.cat(list(gb))
    assert rows.shape == (30, 4) and gb.n_rows() == 30
    cand = torch.stack([acts[0], acts[2]], 1)  # [N, 2, d]
    match = (rows[:, None, None, :] == cand[None]).all(-1)  # [rows, N, 2]
    assert bool(match.any(-1).any(-1).all())
    tokens = match.any(-1).float().argmax(-1)
    assert sorted(tokens.tolist()) == list(range(30))  # every token exactly once per epoch
    which = match.any(1).float().argmax(-1)
    assert 0 < int(which.sum()) < 30  # both layers drawn
    again = torch.cat(list(gb))
    assert torch.equal(rows, again)  # same epoch -> same batches
    gb.set_epoch(1)
    assert not torch.equal(rows, torch.cat(list(gb)))


def test_group_batches_concat_and_standardizers(tmp_path):
    acts = _acts()
    stds = {v: Standardizer.fit(acts[v]) for v in acts}
    gb = GroupBatches(acts, [0, 1, 2], batch_size=9, sampling="concat", standardizers=stds, seed=0)
    rows = torch.cat(list(gb))
    assert rows.shape == (90, 4) and gb.n_rows() == 90
    assert all(b.shape[0] <= 9 for b in gb)
    assert rows.mean(0).abs().max() < 1e-5 and (rows.std(0, unbiased=False) - 1).abs().max() < 1e-4
    cache = write_cache(tmp_path / "c", acts, shard_tokens=8)
    from_cache = torch.cat(list(GroupBatches(cache, [0, 1, 2], 9, sampling="concat", split=None, seed=0)))
    assert from_cache.shape == (90, 4)
    assert sorted(from_cache[:, 0].tolist()) == sorted(torch.cat([acts[v] for v in acts])[:, 0].tolist())
    with pytest.raises(ConfigError):
        GroupBatches(acts, [0, 5], 4)
    with pytest.raises(ConfigError):
        GroupBatches(acts, [0], 4, sampling="mix")


def test_train_group_sae_records_layers(tmp_path):
    acts = _acts(n=64, d=6, seed=2)
    cache = write_cache(tmp_path / "c", acts, model_name="toy")
    stds = {v: Standardizer.fit(acts[v]) for v in acts}
    cfg = SAEConfig(d_in=6, d_sae=12, architecture="topk", k=3, seed=0)
    sae, hist = train_group_sae(cache, [0, 2], cfg, SGDConfig(epochs=3, batch_size=16, lr=5e-3, progress=False),
                                standardizers=stds, split=None)
    assert sae.cfg.metadata["layers"] == [0, 2] and sae.cfg.metadata["group_sampling"] == "uniform"
    assert sae.cfg.metadata["model_name"] == "toy" and len(sae.cfg.metadata["hook_names"]) == 2
    assert hist["step"][-1] == 3 * 4
    assert hist["train_loss"][-1] < hist["train_loss"][0]


# ------------------------------------------------------------------------------------------- transfer
@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu", "gated"])
def test_transfer_init_copies_weights(arch):
    src = SAE(SAEConfig(d_in=5, d_sae=8, architecture=arch, k=2 if arch == "topk" else None, seed=3,
                        metadata={"layers": [2], "model_name": "m"}))
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    dst = transfer_init(src, target_layer=1)
    for (n1, p1), (n2, p2) in zip(src.named_parameters(), dst.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()
    x = torch.randn(10, 5)
    assert torch.equal(src(x), dst(x))
    assert dst.cfg.metadata["transfer_from_layer"] == 2 and dst.cfg.metadata["layers"] == [1]
    assert dst.cfg.metadata["transfer_direction"] == "backward" and src.cfg.metadata["layers"] == [2]
    with torch.no_grad():
        dst.W_enc.add_(1.0)
    assert not torch.equal(src.W_enc, dst.W_enc)  # independent copy


def test_transfer_directions_and_steps_to_target():
    assert transfer_direction(1, 2) == "forward" and transfer_direction(3, 2) == "backward"
    assert source_layer(2, "forward") == 1 and source_layer(2, "backward") == 3
    with pytest.raises(ConfigError):
        transfer_direction(2, 2)
    with pytest.raises(ConfigError):
        source_layer(2, "sideways")
    steps, fvu = [0, 10, 20, 30], [0.9, 0.5, 0.3, 0.31]
    assert steps_to_target(steps, fvu, 0.5) == 10
    assert steps_to_target(steps, fvu, 0.95) == 0
    assert steps_to_target(steps, fvu, 0.3) == 20
    assert steps_to_target(steps, fvu, 0.1) is None


def test_fvu_tracker_in_training():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(96, 6, generator=g)
    sae = SAE(SAEConfig(d_in=6, d_sae=10, architecture="topk", k=2))
    tr = FVUTracker(sae, {"a": X[:32], "b": X[32:64]}, every=2)
    tr.record(0)
    train_sgd(sae, X, SGDConfig(epochs=2, batch_size=16, progress=False, eval_train=False), callback=tr)
    assert tr.steps == [0, 2, 4, 6, 8, 10, 12]
    assert tr.fvu[-1] < tr.fvu[0] and len(tr.per_set["a"]) == len(tr.steps)
    assert tr.fvu[3] == pytest.approx((tr.per_set["a"][3] + tr.per_set["b"][3]) / 2)
    assert tr.seconds > 0
