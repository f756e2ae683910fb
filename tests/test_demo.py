"""`specsearch demo` runs end to end on the bundled sample with the shipped model."""

from __future__ import annotations

import io

from rich.console import Console
from typer.testing import CliRunner

from specsearch.cli.app import app
from specsearch.demo import run_demo
from specsearch.sql import connect


def test_demo_runs_and_writes_only_under_out(tmp_path):
    out = tmp_path / "demo"
    text = io.StringIO()
    timings = run_demo(out, console=Console(file=text, width=120))
    assert set(p.name for p in tmp_path.iterdir()) == {"demo"}
    assert {"ingest", "embed", "index", "search xp->xp", "search lrs->xp", "sql"} <= set(timings)
    con = connect(out / "store")
    counts = dict(con.execute("SELECT modality, count(*) FROM embeddings GROUP BY 1").fetchall())
    assert counts == {"lrs": 2000, "xp": 2000}
    # the shipped model's XP labels of these (training-split) stars are close to APOGEE
    dteff = con.execute(
        "SELECT median(abs(pred_teff - teff)) FROM embeddings JOIN shards USING (source_id) "
        "WHERE modality = 'xp'"
    ).fetchall()[0][0]
    assert dteff < 150
    assert "demo done" in text.getvalue()


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
