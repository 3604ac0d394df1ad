import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

from splinterp import SAE, SAEConfig  # noqa: E402


def random_sae(architecture: str, d_in: int = 6, d_sae: int = 20, k: int | None = 3, seed: int = 0, **kw) -> SAE:
    """A small SAE with random (non-zero) biases so regions are not all cones through the origin."""
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=architecture,
                        k=k if architecture in ("topk", "topk_abs") else None, seed=seed, **kw))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name != "threshold":
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.5 if name.startswith("b") else 1.0))
            else:
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return sae


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: tiny tensors run faster without oversubscribing shared cores, and the
    reduction order matches a subprocess (bit-identical resume tests). Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def make_random_sae():
    return random_sae
