"""Colours for partitions: a large qualitative palette with no two similar colours, and cell colourings
that never give two neighbouring cells the same colour.

The palette is built Glasbey-style (greedy farthest-point sampling in CIELAB, restricted to a light-to-medium
lightness band so fills stay readable under black edges and markers). It is deterministic and its first n
colours are the best n-colour answer of the greedy walk, so ``palette(n)[:m] == palette(m)``.

Colouring rules used across `splinterp.viz`:
- up to ``MAX_DISTINCT`` cells: every cell gets its own colour (no modulo collisions, ever);
- more cells: a greedy graph colouring on the cell adjacency, so two cells that share an edge always differ;
- the same key (site index, k-set, region id) gets the same colour in every panel of one figure when the
  panels are coloured from one shared `ColorMap`.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Iterable, Sequence

import numpy as np

MAX_DISTINCT = 256
_L_RANGE = (52.0, 92.0)  # CIELAB lightness band of the palette
_CHROMA_RANGE = (14.0, 68.0)  # no greys (too close to edges) and no neon


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] [..., 3] -> CIELAB (D65) [..., 3]."""
    rgb = np.asarray(rgb, dtype=np.float64)
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    d = 6.0 / 29.0
    f = np.where(xyz > d**3, np.cbrt(xyz), xyz / (3 * d * d) + 4.0 / 29.0)
    L = 116.0 * f[..., 1] - 16.0
    a = 500.0 * (f[..., 0] - f[..., 1])
    b = 200.0 * (f[..., 1] - f[..., 2])
    return np.stack([L, a, b], axis=-1)


@functools.lru_cache(maxsize=1)
def _greedy_palette() -> np.ndarray:
    steps = np.linspace(0.0, 1.0, 24)
    cand = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), -1).reshape(-1, 3)
    lab = _srgb_to_lab(cand)
    chroma = np.hypot(lab[:, 1], lab[:, 2])
    keep = (lab[:, 0] >= _L_RANGE[0]) & (lab[:, 0] <= _L_RANGE[1]) & (chroma >= _CHROMA_RANGE[0]) & (
        chroma <= _CHROMA_RANGE[1])
    cand, lab = cand[keep], lab[keep]
    # start from a fixed, pleasant blue; then always take the candidate farthest from everything chosen
    start = int(np.argmin(np.linalg.norm(cand - np.array([0.35, 0.55, 0.85]), axis=1)))
    chosen = [start]
    dist = np.linalg.norm(lab - lab[start], axis=1)
    # also keep away from white and black, which are used for edges, background and markers
    dist = np.minimum(dist, np.linalg.norm(lab - _srgb_to_lab(np.ones(3)), axis=1) * 1.5)
    dist = np.minimum(dist, np.linalg.norm(lab - _srgb_to_lab(np.zeros(3)), axis=1) * 1.5)
    for _ in range(MAX_DISTINCT - 1):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(lab - lab[nxt], axis=1))
    return cand[chosen]


def palette(n: int) -> np.ndarray:
    """n perceptually distinct RGB colours [n, 3] in [0, 1] (n <= MAX_DISTINCT)."""
    if n < 0 or n > MAX_DISTINCT:
        raise ValueError(f"palette holds at most {MAX_DISTINCT} distinct colours, asked for {n}; "
                         "use color_cells with an adjacency to colour more cells")
    return _greedy_palette()[:n].copy()


def min_pairwise_distance(colors: np.ndarray) -> float:
    """Smallest CIELAB distance between two colours of a set (how distinguishable the set is)."""
    lab = _srgb_to_lab(np.asarray(colors))
    if len(lab) < 2:
        return float("inf")
    d = np.linalg.norm(lab[:, None] - lab[None], axis=-1)
    d[np.diag_indices(len(lab))] = np.inf
    return float(d.min())


def greedy_coloring(n: int, edges: Iterable[tuple[int, int]], n_colors: int = MAX_DISTINCT) -> np.ndarray:
    """int [n]: a colour index per node with adjacent nodes different (largest degree first, each node
    takes the least used colour not used by a coloured neighbour). Raises if n_colors is too few."""
    nbrs: list[set[int]] = [set() for _ in range(n)]
    for i, j in edges:
        if i != j:
            nbrs[i].add(j)
            nbrs[j].add(i)
    order = sorted(range(n), key=lambda i: (-len(nbrs[i]), i))
    color = np.full(n, -1, dtype=np.int64)
    used = np.zeros(n_colors, dtype=np.int64)
    for i in order:
        banned = {int(color[j]) for j in nbrs[i] if color[j] >= 0}
        free = [c for c in range(n_colors) if c not in banned]
        if not free:
            raise ValueError(f"{n_colors} colours are not enough for this adjacency")
        c = min(free, key=lambda c: (used[c], c))
        color[i] = c
        used[c] += 1
    return color


class ColorMap:
    """A fixed key -> colour assignment shared by the panels of one figure.

    Keys (site indices, sorted k-set tuples, region ids: anything hashable) get colours in the order they
    are given. With at most MAX_DISTINCT keys every key has its own colour; with more, pass `edges`
    (pairs of key positions that touch) and neighbours are guaranteed different.
    """

    def __init__(self, keys: Sequence[Hashable], edges: Iterable[tuple[int, int]] | None = None):
        keys = list(dict.fromkeys(keys))
        self.keys = keys
        self.index = {k: i for i, k in enumerate(keys)}
        n = len(keys)
        if n <= MAX_DISTINCT:
            self.colors = palette(n)
        else:
            if edges is None:
                raise ValueError(f"{n} keys exceed the {MAX_DISTINCT} distinct colours; pass the cell adjacency")
            self.colors = palette(MAX_DISTINCT)[greedy_coloring(n, edges)]

    def __len__(self) -> int:
        return len(self.keys)

    def __call__(self, key: Hashable) -> np.ndarray:
        return self.colors[self.index[key]]

    def rgb_of(self, keys: Sequence[Hashable]) -> np.ndarray:
        return np.stack([self(k) for k in keys]) if len(keys) else np.zeros((0, 3))


def to_hex(rgb: Sequence[float]) -> str:
    r, g, b = (int(round(255 * float(np.clip(c, 0, 1)))) for c in rgb[:3])
    return f"#{r:02x}{g:02x}{b:02x}"
