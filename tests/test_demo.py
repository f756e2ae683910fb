"""`specsearch demo` runs end to end on the bundled sample with the shipped model."""

from __future__ import annotations

import pyarrow.parquet as pq
from typer.testing import CliRunner

from specsearch.cli.app import app
from specsearch.query.sql import connect


def test_demo_runs_two_nights_and_writes_only_under_out(demo_run):
    out, result, shown = demo_run
    assert {p.name for p in out.iterdir()} == {"store"}
    assert set(result.nights) == {"DR1", "DR2"}
    assert result.nights["DR1"].stars == 2000 and result.nights["DR2"].stars == 400
    assert all(n.report.exists() for n in result.nights.values())
    con = connect(out / "store")
    counts = dict(con.execute("SELECT modality, count(*) FROM embeddings GROUP BY 1").fetchall())
    assert counts == {"lrs": 2400, "xp": 2400}
    # the shipped model's XP labels of these (training-split) stars are close to APOGEE
    dteff = con.execute(
        "SELECT median(abs(pred_teff - teff)) FROM embeddings JOIN shards USING (source_id) "
        "WHERE modality = 'xp'"
    ).fetchall()[0][0]
    assert dteff < 150
    # the strangest DR2 stars are injected anomalies, each with an explanation
    truth = pq.read_table(_truth_path()).to_pydict()
    classes = dict(zip(truth["source_id"], truth["anomaly_class"], strict=True))
    top = result.top.to_pylist()
    assert len(top) == 8 and all(row["explanation"] for row in top)
    injected = sum(classes[row["source_id"]] != "normal" for row in top)
    assert injected >= 6, [classes[row["source_id"]] for row in top]
    assert result.search.num_rows == 5 and result.sql_result.num_rows >= 3
    assert any(isinstance(item, str) and item.startswith("demo done") for item in shown)
    assert any(isinstance(item, str) and "why" in item for item in shown)


def _truth_path():
    from specsearch.pipeline.demo import sample_dir

    return sample_dir() / "truth.parquet"


def test_demo_twice_changes_nothing(demo_run):
    out, _, _ = demo_run
    store = out / "store"
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    second = CliRunner().invoke(app, ["demo", "--out", str(out)])
    assert second.exit_code == 0, second.output
    assert second.output.count("nothing changed") == 2
    after = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    assert after == before
