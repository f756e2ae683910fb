"""SpecCLIP model families: shapes, sizes, masking, losses, configs and save/load."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from specsearch.errors import SpecsearchError
from specsearch.grids import N_LRS, N_XP
from specsearch.models import (
    ClipLoss,
    build_model,
    config_to_dict,
    count_parameters,
    get_config,
    load_model,
    save_model,
)
from specsearch.models.heads import LabelHead, LabelHeadConfig, gaussian_nll
from specsearch.models.layers import chunk_mask

PAPER_ENCODER_PARAMS = 43e6


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: threads only add contention on shared CI cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def lrs_batch(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, N_LRS, generator=g)
    stats = torch.stack(
        [1 + 0.05 * torch.randn(n, generator=g), -1 + 0.1 * torch.randn(n, generator=g)], 1
    )
    return z, stats


def xp_batch(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    wave = torch.linspace(0, 1, N_XP)
    x = (
        1
        + 0.5 * torch.sin(6 * wave + torch.rand(n, 1, generator=g))
        + 0.05 * torch.randn(n, N_XP, generator=g)
    )
    return x, -16 + torch.randn(n, 1, generator=g)


# --- SpecFormer tokens -----------------------------------------------------------------------


def test_specformer_tokens_are_overlapping_windows_plus_stats():
    model = build_model("specformer", "small")
    cfg = model.config
    assert (cfg.n_windows, cfg.seq_len, cfg.in_channels) == (145, 146, 21)
    z, stats = lrs_batch(3)
    tokens, weight = model.tokenize(z, stats)
    assert tokens.shape == weight.shape == (3, 146, 21)
    torch.testing.assert_close(tokens[:, 1, 1:], z[:, 0:20])
    torch.testing.assert_close(tokens[:, 2, 1:], z[:, 10:30])
    torch.testing.assert_close(tokens[:, 145, 1:], z[:, 1440:1460])
    assert torch.equal(tokens[:, 0, 0], stats[:, 1]) and torch.equal(tokens[:, 0, 1], stats[:, 0])
    assert torch.all(tokens[:, 1:, 0] == 0) and torch.all(tokens[:, 0, 2:] == 0)
    assert weight[:, 1:, 1:].all() and not weight[:, 1:, 0].any() and weight[:, 0, :2].all()
    back = model.untokenize(tokens)
    torch.testing.assert_close(back[:, :1460], z[:, :1460])
    assert torch.isnan(back[:, 1460:]).all()  # the published tokenisation drops the last 2 pixels


def test_specformer_ivar_channel_and_bad_pixel_weight():
    model = build_model("specformer", {"base": "small", "lrs": {"ivar_channel": True}})
    z, stats = lrs_batch(2)
    ivar = torch.full((2, N_LRS), 400.0)
    ivar[0, 5] = 0.0
    tokens, weight = model.tokenize(z, stats, ivar)
    assert tokens.shape == (2, 146, 41)
    std = 10 ** stats[1, 1]
    q = 400.0 * std**2
    torch.testing.assert_close(tokens[1, 1, 21], torch.sqrt(q / (1 + q)))
    assert tokens[0, 1, 21 + 5] == 0 and weight[0, 1, 1 + 5] == 0 and weight[0, 1, 1 + 6] == 1
    out = model.masked_loss(z, stats, ivar)
    assert out["prediction"].shape == (2, 146, 21) and torch.isfinite(out["loss"])


# --- shapes of every family and variant in `small` ---------------------------------------------


def test_small_encoder_shapes():
    z, stats = lrs_batch(4)
    x, xstats = xp_batch(4)
    lrs = build_model("lrs", "small")
    assert lrs(z, stats).shape == (4, 146, 96) and lrs.embed(z, stats).shape == (4, 96)
    oae = build_model("xp", "small")
    assert oae(x, xstats).shape == (4, 128)
    out = oae.reconstruction_loss(x, xstats)
    assert out["reconstruction"].shape == out["target"].shape == (4, 346)
    torch.testing.assert_close(oae.flux_from_vector(out["target"]), x, atol=1e-5, rtol=1e-5)
    xpt = build_model("xp-transformer", "small")
    assert xpt(x, xstats).shape == (4, 344, 96)
    assert xpt.masked_loss(x, xstats)["prediction"].shape == (4, 344, 3)


@pytest.mark.parametrize("variant", ["base", "pr", "split"])
@pytest.mark.parametrize("xp_encoder", ["oae", "transformer"])
def test_small_specclip_shapes(variant, xp_encoder):
    model = build_model("specclip", {"base": "small", "xp_encoder": xp_encoder}, variant=variant)
    z, stats = lrs_batch(4)
    x, xstats = xp_batch(4)
    lrs_f, xp_f = model.lrs_features(z, stats), model.xp_features(x, xstats)
    assert lrs_f.shape == xp_f.shape == (4, 128)
    dim = 96 if variant == "split" else 128
    assert model.embed_dim == dim and model.embed(lrs_f).shape == (4, dim)
    torch.testing.assert_close(model.embed(xp_f).norm(dim=1), torch.ones(4))
    terms = model.alignment_loss(z, stats, x, xstats)
    expected = {"loss", "clip"} | (
        {"recon_lrs", "recon_xp", "cross_lrs", "cross_xp"} if variant != "base" else set()
    )
    assert set(terms) == expected and all(torch.isfinite(v) for v in terms.values())
    if variant == "base":
        assert not model.has_decoders
    else:
        decoded = model.decode(lrs_f, xp_f)
        assert decoded["lrs_recon"].shape == decoded["lrs_from_xp"].shape == (4, N_LRS)
        assert decoded["xp_recon"].shape == decoded["xp_from_lrs"].shape == (4, N_XP)
        cross_in = model.decoders["lrs_from_xp"].layers[0].fc.in_features
        assert cross_in == dim  # split: cross-prediction from the shared part only
        total = (
            terms["clip"]
            + terms["recon_lrs"]
            + terms["recon_xp"]
            + terms["cross_lrs"]
            + terms["cross_xp"]
        )
        torch.testing.assert_close(terms["loss"], total)


def test_frozen_encoders_get_no_gradient():
    model = build_model("specclip", "small", variant="pr").train()
    z, stats = lrs_batch(8)
    x, xstats = xp_batch(8)
    model.alignment_loss(z, stats, x, xstats)["loss"].backward()
    assert all(p.grad is None for p in model.lrs_encoder.parameters())
    assert all(p.grad is None for p in model.xp_encoder.parameters())
    assert model.lrs_head.pool.query.grad is not None and not model.lrs_encoder.training


# --- paper sizes -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paper_model():
    torch.manual_seed(0)
    return build_model("specclip", "paper", variant="pr").eval()


def test_paper_encoders_have_about_43m_parameters(paper_model):
    counts = count_parameters(paper_model)
    xp_transformer = count_parameters(build_model("xp_transformer", "paper"))["total"]
    for n in (counts["lrs_encoder"], counts["xp_encoder"], xp_transformer):
        assert abs(n - PAPER_ENCODER_PARAMS) / PAPER_ENCODER_PARAMS < 0.10, n
    # the published CLIP heads are 7.08M each
    assert abs(counts["lrs_head"] - 7.08e6) < 0.05e6 and abs(counts["xp_head"] - 7.08e6) < 0.05e6
    assert paper_model.embed_dim == 768 and paper_model.lrs_encoder.config.seq_len == 146


def test_paper_forward_on_two_stars(paper_model):
    z, stats = lrs_batch(2)
    x, xstats = xp_batch(2)
    with torch.no_grad():
        lrs_f, xp_f = paper_model.lrs_features(z, stats), paper_model.xp_features(x, xstats)
        decoded = paper_model.decode(lrs_f, xp_f)
    assert lrs_f.shape == xp_f.shape == (2, 768)
    assert decoded["lrs_from_xp"].shape == (2, N_LRS) and decoded["xp_from_lrs"].shape == (2, N_XP)
    assert all(torch.isfinite(v).all() for v in decoded.values())


# --- masking -----------------------------------------------------------------------------------


def test_chunk_mask_hides_six_contiguous_chunks_of_ten():
    mask = chunk_mask(500, 146, 6, 10, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (500, 146)
    assert torch.all(mask.sum(dim=1) == 60)
    assert abs(mask.float().mean().item() - 60 / 146) < 1e-6 and abs(60 / 146 - 0.41) < 0.005
    starts = (mask[:, 1:] & ~mask[:, :-1]).sum(dim=1) + mask[:, 0].long()
    assert torch.all(starts == 6)  # six separate runs of ten


def test_masked_loss_zeroes_hidden_tokens_and_scores_only_them():
    torch.manual_seed(0)
    model = build_model("specformer", "small")
    z, stats = lrs_batch(3)
    seen = {}

    def keep_input(module, inputs, output):
        seen["tokens"] = inputs[0]

    hook = model.token_embed.register_forward_hook(keep_input)
    out = model.masked_loss(z, stats, generator=torch.Generator().manual_seed(1))
    hook.remove()
    mask = out["mask"]
    assert abs(mask.float().mean().item() - 0.411) < 0.001
    assert torch.all(seen["tokens"][mask] == 0) and torch.any(seen["tokens"][~mask] != 0)
    # the loss is the mean squared error over hidden data elements only
    weight = model.tokenize(z, stats)[1]
    locs = mask[..., None] & (weight > 0)
    expected = ((out["prediction"] - out["target"])[locs] ** 2).mean()
    torch.testing.assert_close(out["loss"], expected)


# --- training signal ---------------------------------------------------------------------------


def test_specformer_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = build_model("specformer", "small").train()
    z, stats = lrs_batch(8)
    z = torch.sin(torch.linspace(0, 30, N_LRS))[None] + 0.1 * z  # learnable structure
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model.masked_loss(z, stats, generator=torch.Generator().manual_seed(0))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_alignment_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = build_model(
        "specclip", {"base": "small", "clip": {"head_dropout": 0.0, "decoder_dropout": 0.0}}
    )
    model.train()
    z, stats = lrs_batch(16)
    x, xstats = xp_batch(16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(30):
        terms = model.alignment_loss(z, stats, x, xstats)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append({k: v.item() for k, v in terms.items()})
    assert losses[-1]["loss"] < 0.3 * losses[0]["loss"], (losses[0], losses[-1])
    assert losses[-1]["clip"] < 0.1 * losses[0]["clip"]
    assert all(
        losses[-1][k] < losses[0][k] for k in ("recon_lrs", "recon_xp", "cross_lrs", "cross_xp")
    )


# --- contrastive loss and temperature ----------------------------------------------------------


def test_infonce_matches_hand_computation():
    lrs = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    xp = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    scale = 2.0
    loss = ClipLoss(gather=False)(lrs, xp, torch.tensor(math.log(scale)))

    a = lrs.numpy() / np.linalg.norm(lrs.numpy(), axis=1, keepdims=True)
    b = xp.numpy() / np.linalg.norm(xp.numpy(), axis=1, keepdims=True)
    logits = scale * a @ b.T
    s = 1 / math.sqrt(2)  # the cosines by hand: rows lrs, columns xp
    assert np.allclose(logits / scale, [[1, s, 0], [0, s, 1], [s, 1, s]])

    def ce(m):
        return np.mean([math.log(np.exp(m[i]).sum()) - m[i, i] for i in range(3)])

    expected = 0.5 * (ce(logits) + ce(logits.T))
    assert abs(loss.item() - expected) < 1e-6


def test_infonce_clamps_the_scale_at_100():
    f = torch.eye(3)
    big = ClipLoss(gather=False)(f, f.roll(1, 0), torch.tensor(10.0))
    at_100 = ClipLoss(gather=False)(f, f.roll(1, 0), torch.tensor(math.log(100.0)))
    torch.testing.assert_close(big, at_100)


def test_temperature_is_learnable():
    model = build_model("specclip", "small", variant="base")
    assert isinstance(model.logit_scale, torch.nn.Parameter) and model.logit_scale.requires_grad
    assert abs(model.logit_scale.item() - math.log(1 / 0.07)) < 1e-6
    z, stats = lrs_batch(6)
    x, xstats = xp_batch(6)
    model.alignment_loss(z, stats, x, xstats)["loss"].backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0
    fixed = build_model("specclip", {"base": "small", "clip": {"learn_temperature": False}})
    assert not any(name == "logit_scale" for name, _ in fixed.named_parameters())


# --- label heads -------------------------------------------------------------------------------


def test_gaussian_nll_ignores_nan_labels():
    mean = torch.tensor([[0.0, 1.0], [2.0, -1.0]], requires_grad=True)
    logvar = torch.tensor([[0.0, 0.5], [-0.5, 1.0]], requires_grad=True)
    target = torch.tensor([[2.0, float("nan")], [1.5, float("nan")]])
    loss = gaussian_nll(mean, logvar, target)
    loss.backward()
    by_hand = np.mean(
        [
            0.5 * (math.log(2 * math.pi) + 0.0 + 4.0),
            0.5 * (math.log(2 * math.pi) - 0.5 + 0.25 * math.exp(0.5)),
        ]
    )
    assert abs(loss.item() - by_hand) < 1e-6
    assert torch.all(mean.grad[:, 1] == 0) and torch.all(logvar.grad[:, 1] == 0)
    assert torch.all(mean.grad[:, 0] != 0) and torch.all(logvar.grad[:, 0] != 0)


def test_label_head_scaler_and_masked_gradient():
    torch.manual_seed(0)
    head = LabelHead(16, LabelHeadConfig(hidden=(32,), dropout=0.0))
    head.set_scaler([5000.0, 3.0, -0.5, 0.1], [800.0, 1.0, 0.4, 0.1])
    assert bool(head.fitted)
    features = torch.randn(5, 16, requires_grad=True)
    labels = torch.tensor([[5200.0, 4.0, -0.2, 0.0]] * 5)
    labels[2] = float("nan")  # a star with no labels at all
    head.loss(features, labels).backward()
    assert torch.all(features.grad[2] == 0) and torch.all(
        features.grad[[0, 1, 3, 4]].abs().sum(1) > 0
    )
    mean_s, logvar = head(features)
    mean, sigma = head.predict(features)
    torch.testing.assert_close(mean, mean_s * head.label_std + head.label_mean)
    torch.testing.assert_close(sigma, torch.exp(0.5 * logvar) * head.label_std)


# --- configs and save/load ---------------------------------------------------------------------


def test_config_round_trip_and_errors():
    cfg = get_config("small")
    data = json.loads(json.dumps(config_to_dict(cfg)))
    assert get_config(data) == cfg
    split = get_config({"base": "small", "clip": {"variant": "split"}})
    assert split.clip.variant == "split" and split.lrs == cfg.lrs
    with pytest.raises(SpecsearchError, match="unknown key"):
        get_config({"base": "small", "clip": {"varient": "split"}})
    with pytest.raises(SpecsearchError, match="unknown model config"):
        get_config("huge")
    with pytest.raises(SpecsearchError, match="unknown model kind"):
        build_model("vision", "small")


@pytest.mark.parametrize("variant", ["pr", "split"])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, variant):
    torch.manual_seed(0)
    model = build_model("specclip", "small", variant=variant)
    model.train()
    z, stats = lrs_batch(8)
    x, xstats = xp_batch(8)
    model.alignment_loss(z, stats, x, xstats)  # move the BatchNorm running statistics
    model.label_heads["xp"].set_scaler([5000.0, 3.0, 0.0, 0.0], [500.0, 1.0, 0.3, 0.1])
    model.eval()
    save_model(model, tmp_path / "m", card={"description": "round trip"})
    assert {p.name for p in (tmp_path / "m").iterdir()} == {
        "model.safetensors",
        "config.json",
        "card.json",
    }
    card = json.loads((tmp_path / "m" / "card.json").read_text())
    assert card["variant"] == variant and card["description"] == "round trip"
    assert card["n_parameters"]["total"] == count_parameters(model)["total"]

    loaded = load_model(tmp_path / "m")
    assert not loaded.training and loaded.config == model.config
    with torch.no_grad():
        for m in (model, loaded):
            m.outputs = (m.lrs_features(z, stats), m.xp_features(x, xstats))
            m.outputs += tuple(m.decode(*m.outputs).values()) + m.label_heads["xp"].predict(
                m.outputs[1]
            )
    for a, b in zip(model.outputs, loaded.outputs, strict=True):
        assert torch.equal(a, b)
    assert loaded.label_heads["xp"].fitted and not loaded.label_heads["lrs"].fitted


def test_half_weights_are_half_the_file_and_load_as_float32(tmp_path):
    torch.manual_seed(0)
    model = build_model("specclip", "small", variant="pr").eval()
    model.label_heads["xp"].set_scaler([5000.0, 3.0, 0.0, 0.0], [500.0, 1.0, 0.3, 0.1])
    save_model(model, tmp_path / "full")
    save_model(model, tmp_path / "half", half=True)
    size = {
        name: (tmp_path / name / "model.safetensors").stat().st_size for name in ("full", "half")
    }
    assert 0.45 < size["half"] / size["full"] < 0.55
    loaded = load_model(tmp_path / "half")
    assert all(
        v.dtype == torch.float32 for v in loaded.state_dict().values() if v.is_floating_point()
    )
    # the small tensors (scalers, biases, temperature) are exact; the matrices within float16
    small = {k: v for k, v in model.state_dict().items() if v.numel() < 4096}
    for name, value in small.items():
        assert torch.equal(loaded.state_dict()[name], value)
    x, xstats = xp_batch(8)
    with torch.no_grad():
        a, b = model.xp_features(x, xstats), loaded.xp_features(x, xstats)
    assert torch.allclose(a, b, rtol=0.02, atol=0.02) and not torch.equal(a, b)


def test_encoder_save_load(tmp_path):
    encoder = build_model("specformer", "small")
    save_model(encoder, tmp_path / "enc")
    loaded = load_model(tmp_path / "enc")
    z, stats = lrs_batch(2)
    with torch.no_grad():
        assert torch.equal(encoder.eval()(z, stats), loaded(z, stats))
    clip = build_model("specclip", "small")
    clip.load_encoders(lrs_encoder=loaded)
    assert torch.equal(clip.lrs_encoder.token_embed.weight, encoder.token_embed.weight)
    with pytest.raises(ValueError, match="does not match"):
        clip.load_encoders(
            lrs_encoder=build_model("specformer", {"base": "small", "lrs": {"depth": 2}})
        )


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(SpecsearchError, match="no such model config"):
        load_model(tmp_path / "nothing")
    save_model(build_model("specformer", "small"), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["config"]["depth"] = 4
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpecsearchError, match="do not match") as err:
        load_model(tmp_path / "m")
    assert "\n" not in str(err.value)
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(SpecsearchError, match="cannot read safetensors"):
        load_model(tmp_path / "m")


def test_l1_reconstruction_uses_good_pixels_only():
    model = build_model("specclip", "small", variant="pr").eval()
    z, stats = lrs_batch(4)
    x, xstats = xp_batch(4)
    ivar = torch.ones(4, N_LRS)
    ivar[:, :700] = 0
    full = model.alignment_loss(z, stats, x, xstats)
    z_bad = z.clone()
    z_bad[:, :700] += 100.0  # garbage where ivar = 0 must not change the LRS terms ...
    masked = model.alignment_loss(z_bad, stats, x, xstats, lrs_ivar=ivar)
    masked_clean = model.alignment_loss(z, stats, x, xstats, lrs_ivar=ivar)
    with torch.no_grad():
        lrs_f = model.lrs_features(z_bad, stats, ivar)
        pred = model.decode(lrs_features=lrs_f)["lrs_recon"]
    expected = F.l1_loss(pred[:, 700:], z_bad[:, 700:])
    torch.testing.assert_close(masked["recon_lrs"], expected)
    assert full["recon_lrs"] != masked_clean["recon_lrs"]  # ... but does change the unmasked ones


def test_sigma_calibration_rescales_to_unit_spread():
    torch.manual_seed(0)
    head = LabelHead(16, LabelHeadConfig(hidden=(8,), dropout=0.0)).eval()
    head.set_scaler([5000.0, 4.0, 0.0, 0.1], [500.0, 0.5, 0.3, 0.1])
    features = torch.randn(4000, 16)
    with torch.no_grad():
        mean, sigma = head.predict(features)
    # references scattered by 2 sigma for teff and 0.5 sigma for logg; fe_h unknown
    noise = torch.randn(4000, 4)
    labels = mean + noise * sigma * torch.tensor([2.0, 0.5, 1.0, 1.0])
    labels[:, 2] = float("nan")
    factors = head.calibrate_sigma(features, labels)
    assert factors[0] == pytest.approx(2.0, rel=0.06) and factors[1] == pytest.approx(0.5, rel=0.06)
    assert factors[2] == 1.0  # no known labels: left alone
    with torch.no_grad():
        _, calibrated = head.predict(features)
    within = ((labels[:, 0] - mean[:, 0]).abs() < calibrated[:, 0]).float().mean()
    assert within == pytest.approx(0.683, abs=0.03)
