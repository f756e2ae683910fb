"""SpecCLIPRunner (batched inference) and the model registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from specsearch.cli.app import app
from specsearch.errors import SpecsearchError
from specsearch.grids import N_LRS, N_XP, XP_NORM_SLICE, lrs_model_input, xp_model_input
from specsearch.models import build_model, registry, save_model
from specsearch.models.runner import SpecCLIPRunner
from specsearch.schema import LABELS


@pytest.fixture(autouse=True)
def one_thread():
    """The runner sets torch to every core; tests keep to one (shared CI cores)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def spectra(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    wave = np.linspace(0, 1, N_LRS)
    lrs = (1 - 0.3 * np.exp(-(((wave - rng.uniform(0.2, 0.8, (n, 1))) / 0.01) ** 2))).astype(
        np.float32
    )
    lrs += 0.01 * rng.standard_normal((n, N_LRS)).astype(np.float32)
    ivar = np.full((n, N_LRS), 1e4, np.float32)
    ivar[:, :30] = 0  # bad pixels
    xp_wave = np.linspace(0, 1, N_XP)
    xp = (
        1e-16 * rng.uniform(0.5, 5, (n, 1)) * (1 + np.sin(3 * xp_wave + rng.uniform(0, 1, (n, 1))))
    ).astype(np.float32)
    return lrs, ivar, xp, 0.01 * xp


@pytest.fixture(scope="module")
def pr_model():
    torch.manual_seed(0)
    model = build_model("specclip", "small", variant="pr")
    model.train()
    lrs, ivar, xp, _ = spectra(32, seed=5)
    z, stats = lrs_model_input(lrs, ivar)
    x, xstats = xp_model_input(xp)
    with torch.no_grad():  # give BatchNorm non-trivial running statistics
        model.alignment_loss(*map(torch.from_numpy, (z, stats, x, xstats)))
    return model.eval()


def runner_for(model, batch_size=None):
    runner = SpecCLIPRunner(model, device="cpu", batch_size=batch_size)
    torch.set_num_threads(1)
    return runner


def test_embeddings_are_unit_vectors_and_batch_size_free(pr_model):
    lrs, ivar, xp, err = spectra(70)
    one = runner_for(pr_model, batch_size=1).run_batch(lrs, ivar, xp, err)
    many = runner_for(pr_model, batch_size=64).run_batch(lrs, ivar, xp, err)
    assert one["lrs_embedding"].dtype == np.float32 and one["lrs_embedding"].shape == (70, 128)
    np.testing.assert_allclose(np.linalg.norm(one["lrs_embedding"], axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(one["xp_embedding"], axis=1), 1, atol=1e-5)
    for key in (
        "lrs_embedding",
        "xp_embedding",
        "lrs_recon",
        "xp_from_lrs",
        "lrs_from_xp",
        "align_cos",
    ):
        np.testing.assert_allclose(one[key], many[key], atol=1e-5, rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(
        one["align_cos"], np.sum(one["lrs_embedding"] * one["xp_embedding"], axis=1), atol=1e-6
    )


def test_a_batch_that_runs_out_of_memory_is_halved_and_redone(pr_model, monkeypatch):
    lrs, ivar, xp, err = spectra(70)
    reference = runner_for(pr_model, batch_size=64).run_batch(lrs, ivar, xp, err)
    runner = runner_for(pr_model, batch_size=64)
    real = pr_model.lrs_features
    seen = []

    def limited(z, stats, ivar):  # as if only 20 stars fit in memory
        seen.append(len(z))
        if len(z) > 20:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(z, stats, ivar)

    monkeypatch.setattr(pr_model, "lrs_features", limited)
    out = runner.run_batch(lrs, ivar, xp, err)
    assert runner.batch_size == 16 and seen[:3] == [64, 32, 16]
    for key in ("lrs_embedding", "xp_embedding", "lrs_recon", "lrs_from_xp"):
        np.testing.assert_allclose(out[key], reference[key], atol=1e-5, rtol=1e-5, err_msg=key)

    def cpu_full(z, stats, ivar):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 4 GB")

    monkeypatch.setattr(pr_model, "lrs_features", cpu_full)
    with pytest.raises(SpecsearchError, match="^out of memory with one star per batch"):
        runner_for(pr_model, batch_size=4).run_batch(lrs[:3], ivar[:3], xp[:3], err[:3])

    def broken(z, stats, ivar):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(pr_model, "lrs_features", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors are not retried
        runner_for(pr_model, batch_size=4).run_batch(lrs[:3], ivar[:3], xp[:3], err[:3])


def test_missing_modality_rows_are_nan(pr_model):
    lrs, ivar, xp, err = spectra(6)
    lrs[1] = np.nan
    ivar[2] = 0  # no good pixel: no LRS either
    xp[4] = np.nan
    out = runner_for(pr_model).run_batch(lrs, ivar, xp, err)
    assert out["has_lrs"].tolist() == [True, False, False, True, True, True]
    assert out["has_xp"].tolist() == [True, True, True, True, False, True]
    for key, missing in (
        ("lrs_embedding", [1, 2]),
        ("lrs_recon", [1, 2]),
        ("xp_from_lrs", [1, 2, 4]),  # needs the observed XP norm too
        ("xp_from_lrs_normalised", [1, 2]),
        ("xp_embedding", [4]),
        ("lrs_from_xp", [4]),
        ("align_cos", [1, 2, 4]),
    ):
        rows = np.flatnonzero(np.isnan(out[key].reshape(6, -1)).all(axis=1)).tolist()
        assert rows == missing, key
        assert np.isfinite(out[key][[i for i in range(6) if i not in missing]]).all(), key
    only_xp = runner_for(pr_model).run_batch(xp_flux=xp)
    assert np.isnan(only_xp["lrs_embedding"]).all() and not only_xp["has_lrs"].any()
    np.testing.assert_allclose(only_xp["xp_embedding"], out["xp_embedding"], atol=1e-6)


def test_spectra_come_back_in_canonical_units(pr_model):
    lrs, ivar, xp, err = spectra(5)
    out = runner_for(pr_model).run_batch(lrs, ivar, xp, err)
    z, stats = lrs_model_input(lrs, ivar)
    x, xstats = xp_model_input(xp)
    with torch.no_grad():
        lrs_f = pr_model.lrs_features(*map(torch.from_numpy, (z, stats, ivar)))
        xp_f = pr_model.xp_features(*map(torch.from_numpy, (x, xstats)))
        decoded = {k: v.numpy() for k, v in pr_model.decode(lrs_f, xp_f).items()}
    norm = xp[:, XP_NORM_SLICE].mean(axis=1, keepdims=True)
    np.testing.assert_allclose(
        out["lrs_recon"],
        stats[:, :1] + 10 ** stats[:, 1:2] * decoded["lrs_recon"],
        rtol=1e-4,
        atol=1e-5,
    )
    np.testing.assert_allclose(out["xp_recon"], decoded["xp_recon"] * norm, rtol=1e-4)
    np.testing.assert_allclose(out["xp_from_lrs"], decoded["xp_from_lrs"] * norm, rtol=1e-4)
    np.testing.assert_allclose(
        out["xp_from_lrs_normalised"], decoded["xp_from_lrs"], rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(out["lrs_from_xp"], decoded["lrs_from_xp"], rtol=1e-4, atol=1e-6)

    runner = runner_for(pr_model)
    np.testing.assert_allclose(runner.translate("lrs", xp_flux=xp), out["lrs_from_xp"], atol=1e-6)
    np.testing.assert_allclose(
        runner.translate("xp", lrs, ivar, xp_flux=xp), out["xp_from_lrs"], rtol=1e-6
    )
    np.testing.assert_allclose(
        runner.translate("xp", lrs, ivar, normalised=True), out["xp_from_lrs_normalised"], atol=1e-6
    )
    with pytest.raises(SpecsearchError, match="needs the star's xp_flux"):
        runner.translate("xp", lrs, ivar)
    np.testing.assert_allclose(runner.encode_lrs(lrs, ivar), out["lrs_embedding"], atol=1e-6)
    np.testing.assert_allclose(runner.encode_xp(xp, err), out["xp_embedding"], atol=1e-6)
    np.testing.assert_allclose(runner.reconstruct_xp(xp), out["xp_recon"], rtol=1e-6)


def test_labels_combine_the_two_modalities(pr_model):
    lrs, ivar, xp, err = spectra(8)
    runner = runner_for(pr_model)
    assert np.isnan(runner.run_batch(lrs, ivar, xp, err)["labels"]["teff"]).all()  # not fitted
    with pytest.raises(SpecsearchError, match="no fitted label heads"):
        runner.predict_labels(lrs, ivar, xp, err)
    fitted = build_model("specclip", "small", variant="pr").eval()
    fitted.load_state_dict(pr_model.state_dict())
    for head in fitted.label_heads.values():
        head.set_scaler([5500.0, 3.5, -0.3, 0.1], [700.0, 1.0, 0.4, 0.1])
    lrs[3] = np.nan
    result = runner_for(fitted).predict_labels(lrs, ivar, xp, err)
    a, b, both = result["lrs_labels"], result["xp_labels"], result["labels"]
    assert set(both) == {f"{label}{s}" for label in LABELS for s in ("", "_err")}
    w_a, w_b = 1 / a["teff_err"] ** 2, 1 / b["teff_err"] ** 2
    expected = (w_a * a["teff"] + w_b * b["teff"]) / (w_a + w_b)
    keep = np.arange(8) != 3
    np.testing.assert_allclose(both["teff"][keep], expected[keep], rtol=1e-5)
    np.testing.assert_allclose(both["teff_err"][keep], (w_a + w_b)[keep] ** -0.5, rtol=1e-5)
    assert both["teff"][3] == b["teff"][3] and np.isnan(a["teff"][3])  # only the XP speaks
    assert (both["teff_err"] <= b["teff_err"]).all() and (b["teff_err"] > 0).all()


def test_base_model_has_nan_spectra_and_refuses_reconstruction():
    lrs, ivar, xp, err = spectra(3)
    runner = runner_for(build_model("specclip", "small", variant="base").eval())
    out = runner.run_batch(lrs, ivar, xp, err)
    assert np.isfinite(out["lrs_embedding"]).all() and np.isnan(out["lrs_recon"]).all()
    with pytest.raises(SpecsearchError, match="has no decoders"):
        runner.reconstruct_lrs(lrs, ivar)
    with pytest.raises(SpecsearchError, match="lrs_flux has shape"):
        runner.encode_lrs(lrs[:, :100])
    with pytest.raises(SpecsearchError, match="unknown output"):
        runner.run_batch(lrs, outputs=["lrs_embeding"])


def test_split_embeddings_are_the_shared_part():
    model = build_model("specclip", "small", variant="split").eval()
    lrs, ivar, xp, err = spectra(4)
    out = runner_for(model).run_batch(lrs, ivar, xp, err)
    assert out["lrs_embedding"].shape == out["xp_embedding"].shape == (4, 96)
    z, stats = lrs_model_input(lrs, ivar)
    with torch.no_grad():
        features = model.lrs_features(*map(torch.from_numpy, (z, stats, ivar))).numpy()
    shared = features[:, :96] / np.linalg.norm(features[:, :96], axis=1, keepdims=True)
    np.testing.assert_allclose(out["lrs_embedding"], shared, atol=1e-5)


# --- registry ----------------------------------------------------------------------------------


def test_registry_lists_and_resolves_user_models(tmp_path, monkeypatch, pr_model):
    monkeypatch.setenv("SPECSEARCH_MODELS", str(tmp_path / "models"))
    shipped = [m for m in registry.list_models() if m["source"] == "shipped"]
    assert [m for m in registry.list_models() if m["source"] == "user"] == []
    save_model(pr_model, tmp_path / "models" / "my-model", card={"description": "a test model"})
    listed = [m for m in registry.list_models() if m["source"] == "user"]
    assert len(listed) == 1 and len(registry.list_models()) == len(shipped) + 1
    assert listed[0] | {"path": None} == {
        "id": "my-model",
        "source": "user",
        "path": None,
        "kind": "specclip",
        "config": "small",
        "variant": "pr",
        "embed_dim": 128,
        "description": "a test model",
    }
    assert registry.resolve_model("my-model") == tmp_path / "models" / "my-model"
    assert (
        registry.resolve_model(tmp_path / "models" / "my-model") == tmp_path / "models" / "my-model"
    )
    card = registry.model_card("my-model")
    assert card["kind"] == "specclip" and card["config"]["clip"]["variant"] == "pr"
    runner = SpecCLIPRunner("my-model", device="cpu")
    assert runner.model_id == "my-model" and runner.variant == "pr"
    with pytest.raises(SpecsearchError, match="unknown model 'nope'"):
        registry.model_card("nope")
    result = CliRunner().invoke(app, ["models", "info", "nope"])
    assert result.exit_code == 2 and "unknown model 'nope'" in result.output
    with pytest.raises(SpecsearchError, match="not a model directory"):
        registry.resolve_model(tmp_path)
    encoder_dir = save_model(build_model("specformer", "small"), tmp_path / "models" / "enc")
    with pytest.raises(SpecsearchError, match="not an aligned SpecCLIP model"):
        SpecCLIPRunner(encoder_dir, device="cpu")


def test_default_model_when_none_is_shipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPECSEARCH_MODELS", str(tmp_path / "empty"))
    if registry.list_models():
        pytest.skip("a model is shipped")
    with pytest.raises(SpecsearchError, match="default model"):
        registry.resolve_model("default")
    result = CliRunner().invoke(app, ["models", "list"])
    assert result.exit_code == 0 and "no models installed" in result.output


def test_cuda_request_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SpecsearchError, match="no CUDA device"):
        SpecCLIPRunner(build_model("specclip", "small", variant="base"), device="cuda")
