"""splinterp: the spline and power-diagram geometry of sparse autoencoders.

    import splinterp as sp
    sae = sp.SAE(sp.SAEConfig(d_in=784, d_sae=256, architecture="topk", k=15))
    sp.geometry.region_stats(sae, X)
"""

__version__ = "0.1.0"

from splinterp import errors, geometry  # noqa: E402
from splinterp.io import as_sae, load, save  # noqa: E402
from splinterp.sae import ARCHITECTURES, SAE, SAEConfig, make_sae  # noqa: E402

__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "as_sae", "errors", "geometry", "load", "make_sae", "save",
           "__version__"]
