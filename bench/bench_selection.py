"""The two per-batch helpers the train step leans on, against what they replaced.

(a) TopK selection of u + b at the train-step shapes: the fused numba kernel (`kernels.topk_select` path
    with the `fast` extra) against torch (bias add, `torch.topk` of k+1 with the tie check, gather), both
    giving the same indices (asserted here). Skipped without numba.
(b) The finiteness check of a training batch: `validation.all_finite` (one sum) against
    `torch.isfinite(x).all()`.
"""

from __future__ import annotations

import torch

from bench.common import interleaved, median, round_ratios, row

SHAPES = [(4096, 4096, 32), (4096, 16384, 64)]  # (rows, d_sae, k)


def run(quick: bool = False) -> dict:
    from splinterp import kernels
    from splinterp.validation import all_finite

    rounds = 3 if quick else 11
    rows, notes = [], [f"torch threads {torch.get_num_threads()}, float32, {rounds} interleaved rounds"]
    gen = torch.Generator().manual_seed(0)
    select = kernels._fused_cpu_select(torch.empty(0), 2, 1)
    if select is None:
        notes.append("numba (the `fast` extra) not installed: selection rows skipped")
    for R, n, k in SHAPES if select is not None else []:
        R = R // 8 if quick else R
        u, b = torch.randn(R, n, generator=gen), torch.randn(n, generator=gen)

        def fused(u=u, b=b, k=k):
            return kernels._fused_topk(select, u, b, k, False)

        def torch_path(u=u, b=b, k=k):
            s = u + b
            ix = kernels._torch_topk_select(s, k)
            return ix, s.gather(1, ix)

        assert torch.equal(fused()[0], torch_path()[0])
        t = interleaved({"fused": fused, "torch": torch_path}, rounds=rounds)
        rows.append(row(f"select {R} x {n}, k {k}: torch (add, topk, gather)", round_ratios(t, "torch", "fused"),
                        "fused numba selection", value=1e3 * median(t["torch"]),
                        baseline_value=1e3 * median(t["fused"])))
    x = torch.randn(512 if quick else 4096, 784, generator=gen)
    t = interleaved({"sum": lambda: all_finite(x), "isfinite": lambda: bool(torch.isfinite(x).all())},
                    rounds=rounds)
    rows.append(row(f"finiteness check of a {x.shape[0]} x 784 batch: isfinite(x).all()",
                    round_ratios(t, "isfinite", "sum"), "validation.all_finite (one sum)",
                    value=1e3 * median(t["isfinite"]), baseline_value=1e3 * median(t["sum"])))
    return {"name": "selection", "rows": rows, "notes": notes}
