"""The training stages end to end on a tiny config: pretrain -> align -> finetune -> load -> embed."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from specsearch.files import write_parquet_atomic
from specsearch.models.factory import load_model, read_card
from specsearch.models.runner import SpecCLIPRunner
from specsearch.pipeline.embed import embed_store
from specsearch.pipeline.ingest import ingest
from specsearch.splits import bucket
from specsearch.store import Store
from specsearch.train.align import align
from specsearch.train.finetune import finetune
from specsearch.train.loop import STATE_FILE, TrainConfig, lr_at
from specsearch.train.pretrain import pretrain

from .conftest import TINY, synthetic_shard


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    table = synthetic_shard(400, 5, "T")
    # ids that step through every split bucket, (source_id // 1024) % 8 = 0..7
    table = table.set_column(0, "source_id", pa.array(np.arange(400, dtype=np.int64) * 1024 + 5))
    write_parquet_atomic(table, root / "shards" / "part-00000.parquet")
    return root / "shards"


def test_lr_schedule_warms_up_and_ends_at_the_floor():
    cfg = TrainConfig(lr=1e-3, warmup_fraction=0.1, min_lr_ratio=0.01)
    assert lr_at(0, 100, cfg) == pytest.approx(1e-4)
    assert lr_at(9, 100, cfg) == pytest.approx(1e-3)
    assert lr_at(100, 100, cfg) == pytest.approx(1e-5)  # the published lr // 100 was 0
    assert lr_at(99, 100, cfg) == pytest.approx(1e-5, rel=0.05)
    assert min(lr_at(s, 100, cfg) for s in range(100)) >= 1e-5 - 1e-12


def test_stages_chain_and_the_model_embeds(tmp_path, shards):
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=2, batch_size=64, lr=1e-3)
    lrs = pretrain("lrs", [shards], tmp_path / "lrs", TINY, cfg, device="cpu", log=lambda s: None)
    xp = pretrain("xp", [shards], tmp_path / "xp", TINY, cfg, device="cpu", log=lambda s: None)
    assert lrs["epochs"] == 2 and math.isfinite(xp["best"])
    history = [
        json.loads(line) for line in (tmp_path / "xp" / "metrics.jsonl").read_text().splitlines()
    ]
    assert history[1]["train_loss"] < history[0]["train_loss"]  # the autoencoder learns
    align(
        [shards],
        tmp_path / "lrs" / "best",
        tmp_path / "xp" / "best",
        tmp_path / "clip",
        "pr",
        TINY,
        cfg,
        device="cpu",
        log=lambda s: None,
    )
    # the aligned model starts from the pre-trained encoders, which stay frozen
    pre = load_model(tmp_path / "xp" / "best")
    aligned = load_model(tmp_path / "clip" / "best")
    for name, value in pre.state_dict().items():
        torch.testing.assert_close(aligned.xp_encoder.state_dict()[name], value)
    finetune(
        tmp_path / "clip" / "best",
        [shards],
        tmp_path / "final",
        "both",
        TrainConfig(epochs=3, batch_size=64),
        device="cpu",
        log=lambda s: None,
    )
    card = read_card(tmp_path / "final")
    assert card["stage"] == "finetune" and card["labels_fitted"] is True

    runner = SpecCLIPRunner(tmp_path / "final", device="cpu")
    assert runner.labels_fitted
    store = tmp_path / "store"
    ingest(shards, store, "DR1", show_progress=False)
    summary = embed_store(store, model=str(tmp_path / "final"), device="cpu", show_progress=False)
    assert "360 LRS and 400 XP" in str(summary)  # every 10th synthetic star has no LRS
    xp_rows = Store(store).embeddings("xp")
    teff = xp_rows.column("pred_teff").to_numpy()
    assert np.isfinite(teff).all() and 2000 < np.median(teff) < 10000


def test_training_reads_no_test_or_reserved_rows(tmp_path, shards):
    from specsearch.train.data import load_arrays

    train = load_arrays([shards], "train")
    val = load_arrays([shards], "val")
    assert set(bucket(train.source_id)) <= {0, 1, 2, 4, 6}
    assert set(bucket(val.source_id)) == {7}
    assert len(train) == 250 and len(val) == 50  # buckets 3 (test) and 5 (reserved) are left out


def test_resume_continues_where_it_stopped(tmp_path, shards):
    cfg = TrainConfig(epochs=3, batch_size=64, lr=1e-3, seed=1)
    torch.manual_seed(0)
    pretrain("xp", [shards], tmp_path / "full", TINY, cfg, device="cpu", log=lambda s: None)
    torch.manual_seed(0)
    pretrain(
        "xp",
        [shards],
        tmp_path / "cut",
        TINY,
        TrainConfig(**{**cfg.__dict__, "stop_after": 1}),
        device="cpu",
        log=lambda s: None,
    )
    state = json.loads((tmp_path / "cut" / STATE_FILE).read_text())
    assert state["epoch"] == 1  # as if killed after the first epoch's checkpoint
    pretrain(
        "xp", [shards], tmp_path / "cut", TINY, cfg, device="cpu", resume=True, log=lambda s: None
    )
    full = load_model(tmp_path / "full").state_dict()
    resumed = load_model(tmp_path / "cut").state_dict()
    for name, value in full.items():
        torch.testing.assert_close(resumed[name], value, atol=1e-5, rtol=1e-4)


def test_warm_start_from_a_specclip_model(tmp_path, shards):
    from specsearch.errors import SpecsearchError
    from specsearch.models.factory import build_model, save_model

    torch.manual_seed(0)
    start = build_model("specclip", TINY, variant="pr")
    save_model(start, tmp_path / "start", {})
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.0, warmup_fraction=0.0, weight_decay=0.0)
    quiet = lambda s: None  # noqa: E731
    # lr 0: the encoder pre-trained from the model's own XP encoder is that encoder
    pretrain("xp", [shards], tmp_path / "xp", TINY, cfg, "cpu", log=quiet, init=tmp_path / "start")
    for name, value in start.xp_encoder.state_dict().items():
        torch.testing.assert_close(load_model(tmp_path / "xp").state_dict()[name], value)
    save_model(start.lrs_encoder, tmp_path / "lrs", {})
    align(
        [shards],
        tmp_path / "lrs",
        tmp_path / "xp",
        tmp_path / "clip",
        "pr",
        TINY,
        cfg,
        device="cpu",
        log=quiet,
        init=tmp_path / "start",
    )
    aligned = dict(load_model(tmp_path / "clip").named_parameters())
    for name, value in start.named_parameters():  # heads and decoders start from the model's
        torch.testing.assert_close(aligned[name], value)  # (BatchNorm statistics move at lr 0)
    with pytest.raises(SpecsearchError, match="does not match"):
        pretrain("lrs", [shards], tmp_path / "bad", "small", cfg, "cpu", init=tmp_path / "start")
