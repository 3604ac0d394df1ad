"""A one-call summary of an SAE's geometry on data: its regions (active sets) and the coarser cells of its
low-order power diagrams.

Why orders: on real activations almost every input has a region of its own (an active set is a k-subset of
thousands of latents), so the structure shows at low orders: the order-m cell of x is the set of its m
largest encoder scores (`PowerDiagram.keys` at order m), and counting the distinct order-m cells the data
visit says how finely the first m choices of the encoder cut the data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from splinterp.errors import ConfigError
from splinterp.geometry.checks import takes_sae
from splinterp.geometry.power import PowerDiagram, power_diagram
from splinterp.geometry.regions import region_stats

__all__ = ["geometry_report", "order_cell_stats"]


def _key_stats(keys: np.ndarray) -> tuple[int, float]:
    """(number of distinct key rows, perplexity exp(entropy) of their empirical distribution)."""
    _, counts = np.unique(keys, axis=0, return_counts=True)
    p = counts / counts.sum()
    return int(counts.size), math.exp(float(-(p * np.log(p)).sum()))


@takes_sae
def order_cell_stats(sae, X, orders: Sequence[int] = (1, 2, 4), batch_size: int = 8192) -> dict[str, float]:
    """For each order m: `order{m}_cells`, the distinct order-m power cells the rows of X fall in, and
    `order{m}_perplexity`, the effective number of those cells. Orders above the number of sites are left out."""
    orders = [int(m) for m in orders]
    if any(m < 1 for m in orders):
        raise ConfigError(f"orders must be positive integers, got {orders}")
    pd = power_diagram(sae)
    Xn = torch.as_tensor(X).detach().to(torch.float64).cpu().numpy()
    out: dict[str, float] = {}
    for m in orders:
        if m > pd.n_sites:
            continue
        dm = PowerDiagram(pd.centers.copy(), pd.weights.copy(), order=m, signed_pairs=pd.signed_pairs)
        keys = np.concatenate([dm.keys(Xn[s:s + batch_size]) for s in range(0, Xn.shape[0], batch_size)])
        n, perplexity = _key_stats(keys)
        out[f"order{m}_cells"] = n
        out[f"order{m}_perplexity"] = perplexity
    return out


@takes_sae
def geometry_report(sae, X, orders: Sequence[int] = (1, 2, 4), batch_size: int = 8192) -> dict:
    """`region_stats` (the 10 largest region sizes only) plus `order_cell_stats` of `sae` on X, one flat dict."""
    stats = region_stats(sae, X, batch_size=batch_size)
    sizes = stats.pop("region_sizes")
    stats.pop("size_histogram")
    n = stats["n_inputs"]
    return {**stats, "regions_per_input": stats["n_regions"] / n, "largest_region_sizes": sizes[:10],
            **order_cell_stats(sae, X, orders, batch_size)}
