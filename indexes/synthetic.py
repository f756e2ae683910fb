"""Clustered unit vectors for tests and benchmarks: a mixture of Gaussians on the sphere.

Real embeddings of stars are clumpy (stellar types, survey selections) and have a low intrinsic
dimension (a handful of physical parameters), which is what makes an inverted file work;
uniformly random vectors would make every index look bad.
"""

from __future__ import annotations

import numpy as np

_BLOCK = 262_144  # rows generated at a time, to bound temporaries for large n


def sphere_mixture(
    n: int,
    d: int,
    n_clusters: int = 100,
    spread: float = 0.5,
    seed: int = 0,
    intrinsic_dim: int | None = None,
    ambient_noise: float = 0.05,
) -> np.ndarray:
    """(n, d) float32 unit vectors drawn around ``n_clusters`` random centres.

    Each vector is a unit centre plus Gaussian noise of total norm about ``spread`` (0.5 gives
    clusters of angular radius ~25 degrees), then normalised. Cluster sizes vary (Dirichlet
    weights), as real populations do. With ``intrinsic_dim`` the centres and the noise lie in a
    random subspace of that dimension, plus isotropic noise of norm ``ambient_noise`` in all d
    dimensions; without it the noise is isotropic in d dimensions.
    """
    rng = np.random.default_rng(seed)
    k = intrinsic_dim or d
    centres = rng.standard_normal((n_clusters, k)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = None
    if intrinsic_dim:
        basis = np.linalg.qr(rng.standard_normal((d, k)))[0].T.astype(
            np.float32
        )  # (k, d) orthonormal
    weights = rng.dirichlet(np.full(n_clusters, 2.0))
    members = rng.choice(n_clusters, size=n, p=weights)
    vectors = np.empty((n, d), np.float32)
    for start in range(0, n, _BLOCK):
        stop = min(start + _BLOCK, n)
        noise = rng.standard_normal((stop - start, k)).astype(np.float32) * (spread / np.sqrt(k))
        block = centres[members[start:stop]] + noise
        if basis is not None:
            block = block @ basis
            block += rng.standard_normal(block.shape).astype(np.float32) * (
                ambient_noise / np.sqrt(d)
            )
        vectors[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return vectors
