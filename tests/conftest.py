"""Shared fixtures: a tiny (untrained) SpecCLIP model and synthetic canonical shards."""

from __future__ import annotations

import numpy as np
import pytest

from specsearch.grids import LRS_WAVELENGTH, XP_WAVELENGTH
from specsearch.models.factory import build_model, save_model
from specsearch.schema import make_shard_table

TINY = {
    "base": "small",
    "lrs": {"width": 32, "depth": 1, "n_heads": 2},
    "xp_oae": {"hidden": 32, "latent": 32},
    "clip": {
        "embed_dim": 32,
        "shared_dim": 16,
        "xp_head_hidden": 32,
        "xp_decoder_hidden": [32, 32, 32],
        "lrs_decoder_hidden": [32, 32, 32],
    },
    "labels": {"hidden": [16]},
}
N_STARS = 300


def synthetic_shard(n: int, seed: int, release: str, first_id: int = 0):
    """Stars with a temperature-dependent XP slope and an H-beta line; every 10th lacks its LRS."""
    rng = np.random.default_rng(seed)
    source_id = (np.arange(first_id, first_id + n) * 4099 + 17).astype(np.int64)
    teff = rng.uniform(4000, 8000, n)
    depth = rng.uniform(0.1, 0.5, n)
    lrs = 1 - depth[:, None] * np.exp(-0.5 * ((LRS_WAVELENGTH[None] - 4862.7) / 6) ** 2)
    lrs = lrs + rng.normal(0, 0.01, lrs.shape)
    lrs[::10] = np.nan
    xp = (XP_WAVELENGTH[None] / 550.0) ** (-3 * teff[:, None] / 6000) * 1e-16
    # broad random features so that even an untrained encoder tells the stars apart
    centres, amplitude = rng.uniform(340, 1000, (n, 3)), rng.normal(0, 1.0, (n, 3))
    bumps = amplitude[:, :, None] * np.exp(
        -0.5 * ((XP_WAVELENGTH[None, None] - centres[..., None]) / 40) ** 2
    )
    xp = xp * np.exp(bumps.sum(axis=1))
    return make_shard_table(
        source_id,
        release,
        lrs_flux=lrs,
        lrs_ivar=np.full(lrs.shape, 1e4),
        xp_flux=xp,
        xp_flux_error=0.01 * xp,
        labels={"teff": teff},
    )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    model = build_model("specclip", TINY, variant="pr")
    for head in model.label_heads.values():
        head.set_scaler([5000.0, 4.0, 0.0, 0.1], [1000.0, 1.0, 0.5, 0.1])
    return save_model(model.eval(), tmp_path_factory.mktemp("models") / "tiny-test-model")
