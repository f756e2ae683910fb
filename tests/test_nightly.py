"""`specsearch nightly`: idempotent, new anomalies reported, exit 0 / 2 / 1, --json."""

from __future__ import annotations

import hashlib
import json

import pytest
from typer.testing import CliRunner

from specsearch.cli.app import app
from specsearch.files import write_parquet_atomic
from specsearch.pipeline.nightly import nightly

from .conftest import synthetic_shard


def _digest(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def nights(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("nightly")
    for release, seed, first in (("N1", 0, 0), ("N2", 1, 10_000)):
        write_parquet_atomic(
            synthetic_shard(300, seed, release, first_id=first), root / release / "part.parquet"
        )
    store = root / "store"
    first = nightly(root / "N1", store, "N1", model=str(tiny_model), top=5, show_progress=False)
    second = nightly(root / "N2", store, "N2", model=str(tiny_model), top=5, show_progress=False)
    return root, store, first, second


def test_each_night_runs_every_stage_and_reports_since_the_last(nights):
    _, store, first, second = nights
    assert first.changed == ["ingest", "embed", "index", "score", "report"]
    assert second.changed == ["ingest", "embed", "index", "score", "report"]
    assert second.since == "N1" and first.since is None
    assert (store / "reports" / "release=N2" / "report.html").exists()
    assert "New since N1" in (store / "reports" / "release=N2" / "report.html").read_text()
    assert len(second.top) == 5 and second.top[0]["rank"] == 1


def test_each_stage_reports_its_time_and_peak_memory(nights):
    _, _, first, second = nights
    for night in (first, second):
        assert list(night.metrics) == ["ingest", "embed", "index", "score", "report"]
        stages = list(night.metrics.values())
        for earlier, later in zip(stages, stages[1:], strict=False):
            # in order, one after the other, and the stages fit inside the night
            assert earlier["started"] + earlier["seconds"] <= later["started"] + 5e-3  # rounding
        assert 0 < sum(m["seconds"] for m in stages) <= night.seconds
        for m in stages:
            # this process's own peak since the stage began: at least what the interpreter
            # holds with numpy and pyarrow loaded, at most this machine's memory
            assert 30 < m["peak_rss_mb"] < 24 * 1024
    assert json.loads(second.to_json())["metrics"] == second.metrics


def test_the_same_night_twice_leaves_the_store_byte_identical(nights, tiny_model):
    root, store, _, _ = nights
    before = _digest(store)
    again = nightly(root / "N2", store, "N2", model=str(tiny_model), top=5, show_progress=False)
    assert again.changed == [] and "nothing changed" in str(again)
    assert _digest(store) == before
    result = CliRunner().invoke(
        app,
        [
            "nightly",
            str(root / "N2"),
            "--store",
            str(store),
            "--release",
            "N2",
            "--model",
            str(tiny_model),
            "--top",
            "5",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["status"] == "ok" and summary["changed"] == [] and summary["since"] == "N1"
    assert summary["stars"] == 300 and len(summary["top"]) == 5
    assert _digest(store) == before


def test_bad_input_exits_2_and_other_failures_exit_1(nights, tiny_model, tmp_path, monkeypatch):
    root, store, _, _ = nights
    runner = CliRunner()
    base = ["--store", str(store), "--model", str(tiny_model)]
    missing = runner.invoke(app, ["nightly", str(tmp_path / "nowhere"), *base, "--release", "N3"])
    assert missing.exit_code == 2 and "no such file" in missing.output
    other = runner.invoke(app, ["nightly", str(root / "N1"), *base, "--release", "N2"])
    assert other.exit_code == 2 and "already in" in other.output
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("no spectra here\n")
    junk = runner.invoke(
        app, ["nightly", str(tmp_path / "junk"), *base, "--release", "N3", "--json"]
    )
    assert junk.exit_code == 2
    assert json.loads(junk.stdout) == {
        "status": "error",
        "exit": 2,
        "message": json.loads(junk.stdout)["message"],
    }
    assert "no usable spectra" in json.loads(junk.stdout)["message"]

    def broken(*args, **kwargs):
        raise RuntimeError("the disk went away")

    import specsearch.pipeline.nightly as module

    monkeypatch.setattr(module, "embed_store", broken)
    write_parquet_atomic(
        synthetic_shard(20, 9, "N4", first_id=90_000), tmp_path / "n4" / "p.parquet"
    )
    failed = runner.invoke(app, ["nightly", str(tmp_path / "n4"), *base, "--release", "N4"])
    assert failed.exit_code == 1
    assert failed.output.strip() == "error: RuntimeError: the disk went away"
