"""One TopK training step (forward, backward, Adam) against the dense encoder matmul, a dense SAE and sparsify;
and a whole `train_sgd` epoch, timed from the trainer itself, against the encoder matmuls of that epoch.

Why these baselines: x @ W_enc is the floor (every score is needed to choose the top k), a plain dense
implementation is what the formulas cost without sparse kernels, and EleutherAI sparsify's SparseCoder
(fused encoder + embedding_bag decoder) is the library users would otherwise train with. All run in one
process, interleaved, float32, torch's default thread count; sparsify is forced onto its eager decoder
(its Triton kernel needs a GPU). The trainer row is what a user pays: `train_sgd` with its defaults
(shuffled batches, validation, history, fused Adam), one call per epoch, setup included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import interleaved, median, round_ratios, row

CONFIGS = [(784, 4096, 32), (384, 16384, 64)]  # (d_in, d_sae, k)
BATCH = 4096
ROUNDS = 11
"""Interleaved rounds per figure (the median of per-round ratios; more rounds, less noise on a shared machine)."""


def _load_sparsify():
    """sparsify's SparseCoder with its eager (embedding_bag) decoder, or None when not installed."""
    if torch.cuda.is_available() is False:
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    try:
        import sparsify.sparse_coder as sc
        from sparsify import SparseCoder, SparseCoderConfig
        from sparsify.utils import eager_decode
    except Exception:  # not installed (it is the optional `bench` extra) or broken
        return None
    sc.decoder_impl = eager_decode  # never the Triton path on CPU
    return SparseCoder, SparseCoderConfig


def _adam(params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-4, fused=True)


def _steps(d_in: int, d_sae: int, k: int, batch: int) -> tuple[dict[str, Callable[[], object]], list[str]]:
    import splinterp as sp

    notes: list[str] = []
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d_in, generator=gen)
    cases: dict[str, Callable[[], object]] = {}

    W = sp.make_sae(d_in, d_sae, "topk", k).W_enc.detach().clone()
    cases["floor"] = lambda: x @ W

    def sae_step(dense: bool) -> Callable[[], object]:
        sae = sp.make_sae(d_in, d_sae, "topk", k, seed=1)
        opt = _adam(sae.parameters())

        def step():
            opt.zero_grad(set_to_none=True)
            loss = (sae(x, dense=dense) - x).pow(2).sum(-1).mean()
            loss.backward()
            opt.step()
            return loss

        return step

    cases["ours"] = sae_step(dense=False)
    cases["dense"] = sae_step(dense=True)

    loaded = _load_sparsify()
    if loaded is None:
        notes.append("sparsify (eai-sparsify) not installed: `pip install -e .[bench]` to compare with it")
    else:
        SparseCoder, SparseCoderConfig = loaded
        torch.manual_seed(1)
        coder = SparseCoder(d_in, SparseCoderConfig(k=k, num_latents=d_sae), device="cpu", dtype=torch.float32)
        opt = _adam(coder.parameters())

        def sparsify_step():
            opt.zero_grad(set_to_none=True)
            out = coder(x)
            out.fvu.backward()
            opt.step()
            return out.fvu

        cases["sparsify"] = sparsify_step
    return cases, notes


TRAINER_BATCHES = 8
"""Batches per timed `train_sgd` epoch (8 x 4096 rows)."""


def _trainer_cases(d_in: int, d_sae: int, k: int, batch: int, n_batches: int) -> dict[str, Callable[[], object]]:
    """One `train_sgd` epoch (eval_train off, and on: the train-metrics pass), the encoder matmuls of the
    same batches (once, and twice: the metrics pass encodes every row again), and the bare train steps on
    the same batches (what the trainer adds around them: shuffling, setup, bookkeeping)."""
    import splinterp as sp
    from splinterp.train import SGDConfig, train_sgd

    gen = torch.Generator().manual_seed(0)
    X = torch.randn(n_batches * batch, d_in, generator=gen)
    W = sp.make_sae(d_in, d_sae, "topk", k).W_enc.detach().clone()

    def floor() -> None:
        for s in range(0, X.shape[0], batch):
            X[s : s + batch] @ W

    sae = sp.make_sae(d_in, d_sae, "topk", k, seed=1)
    cfg = SGDConfig(epochs=1, batch_size=batch, lr=1e-4, progress=False, eval_train=False, eval_batch_size=batch)
    bare = sp.make_sae(d_in, d_sae, "topk", k, seed=1)
    opt = _adam(bare.parameters())

    def bare_steps() -> None:  # the same batches through forward, backward and fused Adam, nothing else
        for s in range(0, X.shape[0], batch):
            x = X[s : s + batch]
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(bare(x), x).backward()
            opt.step()

    return {
        "floor": floor,
        "epoch": lambda: train_sgd(sae, X, cfg),
        "steps": bare_steps,
        "floor2": lambda: (floor(), floor()),
        "epoch_eval": lambda: train_sgd(sae, X, cfg.replace(eval_train=True)),
    }


def trainer_rows(quick: bool, how: str, clock: Callable[[], float] = time.perf_counter) -> list[dict]:
    """The `train_sgd` epoch rows at d_in 784, d_sae 4096, k 32 (batch 4096; 1024 in quick)."""
    d_in, d_sae, k = CONFIGS[0]
    batch = 1024 if quick else BATCH
    n = 2 if quick else TRAINER_BATCHES
    t = interleaved(_trainer_cases(d_in, d_sae, k, batch, n), rounds=3 if quick else ROUNDS, warmup=1, clock=clock)
    ms = {name: 1e3 * median(ts) for name, ts in t.items()}
    tag = f"d_in {d_in}, d_sae {d_sae}, k {k}: train_sgd epoch of {n} x {batch} rows"
    r = round_ratios(t, "epoch", "floor")
    r2 = round_ratios(t, "epoch_eval", "floor2")
    r3 = round_ratios(t, "epoch", "steps")
    return [
        row(f"{tag} ({how})", r, f"x @ W_enc for the {n} batches", value=ms["epoch"], baseline_value=ms["floor"],
            target="<= 1.3", ok=r <= 1.3),
        row(f"{tag}, against the bare steps ({how})", r3, f"{n} bare train steps (forward, backward, fused Adam)",
            value=ms["epoch"], baseline_value=ms["steps"]),
        row(f"{tag}, with the train-metrics pass (eval_train=True) ({how})", r2, "x @ W_enc for the batches, twice",
            value=ms["epoch_eval"], baseline_value=ms["floor2"]),
    ]


def profile_ours(d_in: int, d_sae: int, k: int, batch: int, top: int = 8) -> list[str]:
    """The ops that dominate our step (self CPU time over two steps), as text lines."""
    from torch.profiler import ProfilerActivity, profile

    cases, _ = _steps(d_in, d_sae, k, batch)
    step = cases["ours"]
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [
        f"{e.key}: {e.self_cpu_time_total / 2e3:.1f} ms/step ({100 * e.self_cpu_time_total / total:.0f}%)"
        for e in events[:top]
    ]


def _rows(tag: str, how: str, t: dict[str, list[float]]) -> list[dict]:
    ms = {name: 1e3 * median(ts) for name, ts in t.items()}
    out = []
    r = round_ratios(t, "ours", "floor")
    out.append(
        row(
            f"{tag}: our train step ({how})",
            r,
            "x @ W_enc (dense encoder matmul)",
            value=ms["ours"],
            baseline_value=ms["floor"],
            target="<= 1.3",
            ok=r <= 1.3,
        )
    )
    r = round_ratios(t, "dense", "ours")
    out.append(
        row(f"{tag}: plain dense train step ({how})", r, "our train step", value=ms["dense"], baseline_value=ms["ours"])
    )
    if "sparsify" in t:
        r = round_ratios(t, "sparsify", "ours")
        out.append(
            row(
                f"{tag}: sparsify SparseCoder train step ({how})",
                r,
                "our train step",
                value=ms["sparsify"],
                baseline_value=ms["ours"],
                target=">= 2",
                ok=r >= 2,
            )
        )
    return out


def _passive_child(quick: bool) -> list[dict]:
    """The wall-time rows again, in a child process whose idle OpenMP workers sleep instead of spinning
    (OMP_WAIT_POLICY=PASSIVE, which must be set before OpenMP starts). Why: on a shared machine the
    default spin-waits of the many short parallel ops of a sparse step compete with other users' work."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "SPARSIFY_DISABLE_TRITON": "1"}
    code = f"import json; from bench.bench_train_step import wall_rows; print(json.dumps(wall_rows({quick})))"
    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"passive-wait child failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _how() -> str:
    return f"wall, {torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"


def wall_rows(quick: bool) -> list[dict]:
    """Wall-time rows of every config at torch's default thread count."""
    how = _how()
    rows = []
    for d_in, d_sae, k in CONFIGS:
        cases, _ = _steps(d_in, d_sae, k, 1024 if quick else BATCH)
        rows += _rows(f"d_in {d_in}, d_sae {d_sae}, k {k}", how, interleaved(cases, rounds=3 if quick else ROUNDS))
        if (d_in, d_sae, k) == CONFIGS[0]:
            rows += trainer_rows(quick, how)
    return rows


def run(quick: bool = False) -> dict:
    """Per config: wall time at torch's default thread count (the headline), CPU time of a single thread
    (torch.set_num_threads(1), time.thread_time: a busy shared machine cannot inflate it), and the wall
    time again with passive OpenMP waits (child process)."""
    from splinterp import kernels

    batch = 1024 if quick else BATCH
    rounds = 3 if quick else ROUNDS
    threads = torch.get_num_threads()
    rows: list[dict] = []
    notes = [
        f"float32, batch {batch}, loss mean_b |x_hat - x|^2 (sparsify: its fvu), Adam(fused=True) for all",
        "train_sgd epoch rows: one train_sgd(..., SGDConfig(epochs=1)) call per round (setup included), random "
        "N(0, 1) rows; its loss is the mean over elements (the trainer's own)",
        f"wall: torch's default {threads} threads; cpu-1t: CPU time with 1 thread (immune to other users' load)",
        f"CPU TopK selection: {kernels.cpu_kernel_backend()} (numba: the `fast` extra; SPLINTERP_NUMBA=0: torch)",
    ]
    for d_in, d_sae, k in CONFIGS:
        tag = f"d_in {d_in}, d_sae {d_sae}, k {k}"
        cases, extra = _steps(d_in, d_sae, k, batch)
        notes += extra
        rows += _rows(tag, _how(), interleaved(cases, rounds=rounds, warmup=1))
        torch.set_num_threads(1)
        try:
            rows += _rows(tag, "cpu-1t", interleaved(cases, rounds=rounds, warmup=1, clock=time.thread_time))
        finally:
            torch.set_num_threads(threads)
        del cases
        if (d_in, d_sae, k) == CONFIGS[0]:
            rows += trainer_rows(quick, _how())
            torch.set_num_threads(1)
            try:
                rows += trainer_rows(quick, "cpu-1t", clock=time.thread_time)
            finally:
                torch.set_num_threads(threads)
        if not quick:
            notes.append(
                f"{tag}: where our step goes (profile, {threads} threads): "
                + "; ".join(profile_ours(d_in, d_sae, k, batch))
            )
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        try:
            rows += _passive_child(quick)
        except Exception as e:  # the headline rows stand without it
            notes.append(f"passive-wait child run failed: {e}")
    return {"name": "train_step", "rows": rows, "notes": notes}
