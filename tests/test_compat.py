"""Loading published SpecCLIP (Lightning) checkpoints: a synthetic state dict in the published layout.

The published key names are written out here by hand, from the published module attributes, so
these tests check `compat`'s mapping table against an independent statement of that layout.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from specsearch.errors import SpecsearchError
from specsearch.models.compat import load_published, published_config


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _linear(sd, name, out_dim, in_dim, make):
    sd[f"{name}.weight"] = make(out_dim, in_dim)
    sd[f"{name}.bias"] = make(out_dim)


def _norm(sd, name, dim, make):
    sd[f"{name}.weight"] = 1 + 0.1 * make(dim)
    sd[f"{name}.bias"] = make(dim)


def published_specformer(prefix, width, depth, mlp_hidden, make, in_ch=21, max_len=150):
    sd = {}
    _linear(sd, f"{prefix}data_embed", width, in_ch, make)
    sd[f"{prefix}position_embed.weight"] = make(max_len, width)
    for i in range(depth):
        b = f"{prefix}blocks.{i}."
        _norm(sd, b + "ln1", width, make)
        _norm(sd, b + "ln2", width, make)
        _linear(sd, b + "attention.q_proj", width, width, make)
        _linear(sd, b + "attention.kv_proj", 2 * width, width, make)
        _linear(sd, b + "attention.out_proj", width, width, make)
        _linear(sd, b + "mlp.0", mlp_hidden, width, make)
        _linear(sd, b + "mlp.2", width, mlp_hidden, make)
    _norm(sd, f"{prefix}final_layernorm", width, make)
    _linear(sd, f"{prefix}head", in_ch, width, make)
    return sd


def published_oae(prefix, hidden, expansion, n_blocks, latent, make, input_dim=345):
    sd = {}
    _linear(sd, f"{prefix}input_proj", hidden, input_dim, make)
    for part in ("encoder_blocks", "decoder_blocks"):
        for i in range(n_blocks):
            _norm(sd, f"{prefix}{part}.{i}.norm", hidden, make)
            _linear(sd, f"{prefix}{part}.{i}.mlp.0", expansion * hidden, hidden, make)
            _linear(sd, f"{prefix}{part}.{i}.mlp.3", hidden, expansion * hidden, make)
    _linear(sd, f"{prefix}bottleneck_down", latent, hidden, make)
    _norm(sd, f"{prefix}bottleneck_norm", latent, make)
    _linear(sd, f"{prefix}bottleneck_up", hidden, latent, make)
    _linear(sd, f"{prefix}output_proj", input_dim, hidden, make)
    return sd


def published_decoder(prefix, in_dim, hidden, out_dim, make):
    sd = {}
    widths = (in_dim, *hidden)
    for k, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        _linear(sd, f"{prefix}decoder.{4 * k}", b, a, make)
        _norm(sd, f"{prefix}decoder.{4 * k + 2}", b, make)
        sd[f"{prefix}decoder.{4 * k + 2}.running_mean"] = make(b)
        sd[f"{prefix}decoder.{4 * k + 2}.running_var"] = 1 + make(b).abs()
        sd[f"{prefix}decoder.{4 * k + 2}.num_batches_tracked"] = torch.tensor(1234)
    _linear(sd, f"{prefix}decoder.{4 * len(hidden)}", out_dim, widths[-1], make)
    return sd


def published_clip(config, make, mha: nn.MultiheadAttention):
    """A CLIP-stage (pr) state dict with the published attribute names and `config`'s sizes."""
    lrs, oae, clip = config.lrs, config.xp_oae, config.clip
    e = clip.embed_dim
    sd = published_specformer(
        "lamost_lrs_encoder.backbone.", lrs.width, lrs.depth, lrs.mlp_ratio * lrs.width, make
    )
    sd |= published_oae(
        "gaia_xp_encoder.backbone.", oae.hidden, oae.expansion, oae.n_blocks, oae.latent, make
    )
    sd["lamost_lrs_encoder.cross_attention.query"] = make(1, 1, e)
    for key, value in mha.state_dict().items():
        sd[f"lamost_lrs_encoder.cross_attention.multihead_attn.{key}"] = value.clone()
    _norm(sd, "lamost_lrs_encoder.cross_attention.layernorm", e, make)
    _linear(sd, "lamost_lrs_encoder.mlp.encoder", 4 * e, e, make)
    _linear(sd, "lamost_lrs_encoder.mlp.decoder", e, 4 * e, make)
    _linear(sd, "gaia_xp_encoder.projection", e, oae.latent, make)
    _linear(sd, "gaia_xp_encoder.feature_mlp.0", clip.xp_head_hidden, e, make)
    _norm(sd, "gaia_xp_encoder.feature_mlp.1", clip.xp_head_hidden, make)
    _linear(sd, "gaia_xp_encoder.feature_mlp.3", e, clip.xp_head_hidden, make)
    _norm(sd, "gaia_xp_encoder.feature_mlp.4", e, make)
    _linear(sd, "gaia_xp_encoder.mlp.encoder", 4 * e, e, make)
    _linear(sd, "gaia_xp_encoder.mlp.decoder", e, 4 * e, make)
    for name, hidden, out in (
        ("gaia_xp_decoder", clip.xp_decoder_hidden, 343),
        ("gaia_xp_cross_decoder", clip.xp_decoder_hidden, 343),
        ("lamost_lrs_decoder", clip.lrs_decoder_hidden, 1462),
        ("lamost_lrs_cross_decoder", clip.lrs_decoder_hidden, 1462),
    ):
        sd |= published_decoder(f"{name}.", e, hidden, out, make)
    return sd


def maker(seed=0):
    g = torch.Generator().manual_seed(seed)
    return lambda *shape: 0.05 * torch.randn(*shape, generator=g)


def make_published(layout: str):
    """(base config, published state dict, the MultiheadAttention it came from).

    "small": LRS tokens narrower than the embedding (MultiheadAttention keeps q/k/v_proj_weight);
    "square": equal widths, as in the paper (one in_proj_weight).
    """
    base = {"base": "small"} if layout == "small" else {"base": "small", "lrs": {"width": 128}}
    config = published_config("pr", base)
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(
        config.clip.embed_dim,
        config.clip.pool_heads,
        batch_first=True,
        kdim=config.lrs.width,
        vdim=config.lrs.width,
    )
    return base, published_clip(config, maker(), mha), mha


@pytest.fixture(scope="module", params=["small", "square"])
def published(request):
    return make_published(request.param)


@pytest.fixture(scope="module")
def published_small():
    return make_published("small")


def test_every_parameter_comes_from_the_checkpoint(published):
    base, sd, mha = published
    model = load_published(sd, "specclip", "pr", base)
    state = model.state_dict()
    from_checkpoint = [k for k in state if not k.startswith("label_heads.") and k != "logit_scale"]
    # q_proj + kv_proj fuse into one qkv, and in_proj (or q/k/v) splits into three
    n_attn = model.config.lrs.depth
    n_mha = sum(1 for k in mha.state_dict() if not k.startswith("out_proj"))
    assert len(sd) - n_attn * 2 - n_mha + 6 == len(from_checkpoint)

    q = sd["lamost_lrs_encoder.backbone.blocks.1.attention.q_proj.weight"]
    kv = sd["lamost_lrs_encoder.backbone.blocks.1.attention.kv_proj.weight"]
    assert torch.equal(state["lrs_encoder.blocks.1.attn.qkv.weight"], torch.cat([q, kv]))
    assert torch.equal(
        state["xp_encoder.to_latent.weight"], sd["gaia_xp_encoder.backbone.bottleneck_down.weight"]
    )
    assert torch.equal(
        state["decoders.lrs_from_xp.layers.2.norm.running_var"],
        sd["lamost_lrs_cross_decoder.decoder.10.running_var"],
    )
    assert torch.equal(
        state["decoders.xp_recon.out.weight"], sd["gaia_xp_decoder.decoder.12.weight"]
    )
    assert int(state["decoders.xp_recon.layers.0.norm.num_batches_tracked"]) == 1234
    assert torch.equal(
        state["xp_head.feature.norm_hidden.bias"], sd["gaia_xp_encoder.feature_mlp.1.bias"]
    )
    assert abs(model.logit_scale.item() - math.log(15.5)) < 1e-6 and not model.labels_fitted
    assert not model.training


def test_attention_pool_equals_torch_multihead_attention(published):
    base, sd, mha = published
    model = load_published(sd, "specclip", "pr", base)
    tokens = torch.randn(3, 146, model.config.lrs.width)
    query = sd["lamost_lrs_encoder.cross_attention.query"]
    with torch.no_grad():
        expected = mha.eval()(query.repeat(3, 1, 1), tokens, tokens)[0][:, 0]
        torch.testing.assert_close(model.lrs_head.pool(tokens), expected, atol=1e-5, rtol=1e-4)


def test_published_attention_scale_is_reproduced(published):
    """Published flash path: q * d**-0.5, then scaled_dot_product_attention scales again."""
    base, sd, _ = published
    model = load_published(sd, "specclip", "pr", base)
    width, heads = model.config.lrs.width, model.config.lrs.n_heads
    d = width // heads
    p = "lamost_lrs_encoder.backbone.blocks.0.attention."
    x = torch.randn(2, 146, width)
    q = F.linear(x, sd[p + "q_proj.weight"], sd[p + "q_proj.bias"])
    k, v = F.linear(x, sd[p + "kv_proj.weight"], sd[p + "kv_proj.bias"]).chunk(2, dim=-1)
    q, k, v = (a.view(2, 146, heads, d).transpose(1, 2) for a in (q, k, v))
    y = F.scaled_dot_product_attention(q * d**-0.5, k, v).transpose(1, 2).reshape(2, 146, width)
    expected = F.linear(y, sd[p + "out_proj.weight"], sd[p + "out_proj.bias"])
    with torch.no_grad():
        torch.testing.assert_close(
            model.lrs_encoder.blocks[0].attn(x), expected, atol=1e-5, rtol=1e-4
        )


def test_lightning_checkpoint_file(tmp_path, published_small):
    base, sd, _ = published_small
    path = tmp_path / "last.ckpt"
    wrapped = {f"model.{k}": v for k, v in sd.items()}
    torch.save({"state_dict": wrapped, "epoch": 110, "hyper_parameters": {"lr": 1e-4}}, path)
    model = load_published(path, "specclip", "pr", base)
    assert torch.equal(model.lrs_encoder.head.weight, sd["lamost_lrs_encoder.backbone.head.weight"])


def test_clear_errors_for_bad_checkpoints(tmp_path, published_small):
    base, sd, _ = published_small
    missing = dict(sd)
    del missing["gaia_xp_encoder.feature_mlp.3.weight"]
    with pytest.raises(SpecsearchError, match=r"lacks 'xp_head\.feature\.out\.weight'"):
        load_published(missing, "specclip", "pr", base)
    wrong = dict(sd)
    wrong["lamost_lrs_encoder.backbone.head.weight"] = torch.zeros(
        20, wrong["lamost_lrs_encoder.backbone.head.weight"].shape[1]
    )
    with pytest.raises(SpecsearchError, match=r"lrs_encoder\.head\.weight: published shape \(20,"):
        load_published(wrong, "specclip", "pr", base)
    extra = {**sd, "lamost_lrs_encoder.backbone.blocks.0.attention.rotary.freqs": torch.zeros(3)}
    with pytest.raises(SpecsearchError, match="has no specsearch counterpart"):
        load_published(extra, "specclip", "pr", base)
    no_kv = {k: v for k, v in sd.items() if "blocks.2.attention.kv_proj" not in k}
    with pytest.raises(SpecsearchError, match="no .*kv_proj"):
        load_published(no_kv, "specclip", "pr", base)
    with pytest.raises(SpecsearchError, match="variants base and pr"):
        load_published(sd, "specclip", "split", base)
    with pytest.raises(SpecsearchError, match="no such checkpoint"):
        load_published(tmp_path / "absent.ckpt")


def test_pretraining_checkpoints_at_paper_size():
    """The paper config has the published shapes: SpecFormer and OAE checkpoints load into it."""
    cfg = published_config()
    empty = lambda *shape: torch.zeros(*shape)  # noqa: E731 - shapes are what is tested here
    lrs = published_specformer("", cfg.lrs.width, cfg.lrs.depth, 4 * cfg.lrs.width, empty)
    model = load_published(lrs, "specformer")
    assert model.config.width == 768 and model.pos_embed.weight.shape == (150, 768)
    oae = published_oae("", 1290, 3, 2, 768, empty)
    model = load_published(oae, "xp_oae")
    assert model.input_proj.weight.shape == (1290, 345) and not model.config.residual
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in oae.values())
