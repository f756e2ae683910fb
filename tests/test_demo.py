"""`specsearch demo` runs end to end on the bundled sample with the shipped model."""

from __future__ import annotations

from typer.testing import CliRunner

from specsearch.cli.app import app
from specsearch.pipeline.demo import run_demo
from specsearch.query.sql import connect


def test_demo_runs_and_writes_only_under_out(tmp_path):
    out = tmp_path / "demo"
    shown = []
    result = run_demo(out, show=shown.append)
    assert set(p.name for p in tmp_path.iterdir()) == {"demo"}
    assert {"ingest", "embed", "index", "search xp->xp", "search lrs->xp", "sql"} <= set(
        result.timings
    )
    assert result.steps["ingest"].stars == 2000 and result.steps["embed"].xp == 2000
    con = connect(out / "store")
    counts = dict(con.execute("SELECT modality, count(*) FROM embeddings GROUP BY 1").fetchall())
    assert counts == {"lrs": 2000, "xp": 2000}
    # the shipped model's XP labels of these (training-split) stars are close to APOGEE
    dteff = con.execute(
        "SELECT median(abs(pred_teff - teff)) FROM embeddings JOIN shards USING (source_id) "
        "WHERE modality = 'xp'"
    ).fetchall()[0][0]
    assert dteff < 150
    searches = result.searches["search xp->xp"]
    assert searches.num_rows == 5 and searches.column("rank").to_pylist() == [1, 2, 3, 4, 5]
    assert any(isinstance(item, str) and item.startswith("demo done") for item in shown)


def test_demo_twice_changes_nothing(tmp_path):
    runner = CliRunner()
    first = runner.invoke(app, ["demo", "--out", str(tmp_path)])
    assert first.exit_code == 0, first.output
    files = {
        p: p.stat().st_mtime_ns for p in (tmp_path / "store" / "embeddings").rglob("*.parquet")
    }
    second = runner.invoke(app, ["demo", "--out", str(tmp_path)])
    assert second.exit_code == 0 and "nothing to do" in second.output
    assert {p: p.stat().st_mtime_ns for p in files} == files
