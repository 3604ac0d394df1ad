"""Data: MNIST and friends, toy sets, LLM activation harvesting and caching."""

from splinterp.data.cache import ActivationCache, Standardizer
from splinterp.data.harvest import harvest, write_cache
from splinterp.data.mnist import (
    FASHION_MNIST_ROOT,
    load_fashion_mnist,
    load_idx_split,
    load_mnist,
    read_idx,
)
from splinterp.data.text import offline_texts
from splinterp.data.toy import grid_extent, grid_to_image, make_grid, make_three_clusters, train_test_split

__all__ = [
    "ActivationCache",
    "FASHION_MNIST_ROOT",
    "Standardizer",
    "harvest",
    "offline_texts",
    "write_cache",
    "grid_extent",
    "grid_to_image",
    "load_fashion_mnist",
    "load_idx_split",
    "load_mnist",
    "make_grid",
    "make_three_clusters",
    "read_idx",
    "train_test_split",
]
