"""Reference autoencoders: the piecewise-constant and piecewise-affine baselines an SAE is compared with.

- `KMeansAE`: one-hot code of the nearest centroid, decoder = centroids (Voronoi cells, constant pieces).
- `LocalPCAAE`: k-flats / local PCA, per region a mean and a rank-r basis (quadric boundaries, affine
  pieces); the optimal piecewise-affine AE with rank-r pieces. Rank 0 is k-means.
- `PCAAE`: exact PCA, the single-region case.

All are scikit-learn style (`fit`, `transform`, `inverse_transform`) and SAE style (`encode`, `decode`,
`forward`, `W_dec`, `b_dec`): every decoder is linear, x_hat = Z @ W_dec + b_dec.
"""

from splinterp.reference._base import ReferenceAE
from splinterp.reference.kmeans import KMeansAE, KMeansConfig
from splinterp.reference.local_pca import LocalPCAAE, LocalPCAConfig
from splinterp.reference.pca import PCAAE, PCAConfig

__all__ = ["KMeansAE", "KMeansConfig", "LocalPCAAE", "LocalPCAConfig", "PCAAE", "PCAConfig", "ReferenceAE"]
