"""Triage: marks are kept, re-rank the next reports (never the scores), survive new releases,
and "interesting" finds more like it; the CLI and the API twins."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import specsearch as ss
from specsearch.cli.app import app
from specsearch.errors import SpecsearchError
from specsearch.pipeline.nightly import nightly
from specsearch.query.triage import latest_marks, more_like, triaged
from specsearch.sim.simulate import simulate_release


@pytest.fixture(scope="module")
def night3(demo_run, tmp_path_factory):
    """A copy of the demo store with a third night: 1,200 simulated stars (real XP of other
    train stars, simulated LRS), 16% anomalies: 24 of each class."""
    out, _, _ = demo_run
    root = tmp_path_factory.mktemp("triage")
    store = root / "store"
    shutil.copytree(out / "store", store)
    taken = np.array(
        [r[0] for r in ss.open_store(store).sql("SELECT source_id FROM shards").fetchall()]
    )
    simulate_release(
        root / "sim",
        n=1200,
        seed=7,
        release="DR3",
        anomaly_fraction=0.16,
        real_xp_fraction=1.0,
        real_xp_split="train",
        exclude_source_ids=taken,
    )
    nightly(root / "sim" / "shards" / "release=DR3", store, "DR3", top=5, show_progress=False)
    truth = pq.read_table(root / "sim" / "truth.parquet").to_pydict()
    return store, dict(zip(truth["source_id"], truth["anomaly_class"], strict=True))


def _classes(table, kind, top):
    return Counter(kind[i] for i in table.column("source_id").to_pylist()[:top])


def test_marking_five_of_a_class_boring_pushes_it_out_of_the_top_50(night3):
    store, kind = night3
    api = ss.open_store(store)
    before = triaged(store, "DR3")
    ids = before.column("source_id").to_pylist()
    carbon = [i for i in ids if kind[i] == "carbon_star"]
    assert _classes(before, kind, 50)["carbon_star"] >= 5  # they rank high before
    scores_file = (store / "scores" / "release=DR3" / "scores.parquet").read_bytes()
    api.mark(carbon[:5], "boring", note="not my science", user="tester", release="DR3")
    after = triaged(store, "DR3")
    assert _classes(after, kind, 50)["carbon_star"] == 0
    # the other classes keep their recall in the top 200 (the anomalies there are 192)
    n = 200
    for name in set(kind.values()) - {"normal", "carbon_star"}:
        assert _classes(after, kind, n)[name] >= _classes(before, kind, n)[name] - 1, name
    # the stored scores are unchanged; the adjusted rank is a separate column with the reason
    assert (store / "scores" / "release=DR3" / "scores.parquet").read_bytes() == scores_file
    first = after.to_pylist()
    marked = [r for r in first if r["source_id"] in carbon[:5]]
    assert all(r["mark"] == "boring" and r["adjusted_score"] == 0 for r in marked)
    pushed = [r for r in first if r["triage"].startswith("like ")]
    assert pushed and all(r["adjusted_score"] < r["score"] for r in pushed)
    # the marks hold in the other releases too (they are keyed by source_id)
    assert set(latest_marks(api.store).column("source_id").to_pylist()) == set(carbon[:5])
    # a later mark of the same star wins
    api.mark([carbon[0]], "interesting", note="second look")
    latest = latest_marks(api.store).to_pylist()
    assert {r["source_id"]: r["mark"] for r in latest}[carbon[0]] == "interesting"
    like = more_like(store, "DR3")
    assert list(like) == [carbon[0]] and like[carbon[0]].num_rows == 5
    assert carbon[0] not in like[carbon[0]].column("source_id").to_pylist()


def test_mark_cli_import_and_errors(night3, tmp_path):
    store, kind = night3
    runner = CliRunner()
    ids = [i for i, c in kind.items() if c == "flux_tilt"][:2]
    csv = tmp_path / "marks.csv"
    csv.write_text("source_id,mark,note\n" + "".join(f"{i},artefact,tilted\n" for i in ids))
    result = runner.invoke(app, ["mark", "--store", str(store), "--import", str(csv)])
    assert result.exit_code == 0 and "imported 2 marks" in result.output
    result = runner.invoke(app, ["mark", "--store", str(store), str(ids[0]), "--as", "dull"])
    assert (
        result.exit_code == 2 and "a mark is one of boring, interesting, artefact" in result.output
    )
    result = runner.invoke(app, ["mark", "--store", str(store), "42", "--as", "boring"])
    assert result.exit_code == 2 and "source_id 42 is not in" in result.output
    result = runner.invoke(app, ["triage", "--store", str(store), "--release", "DR3", "--top", "3"])
    assert result.exit_code == 0 and "after triage" in result.output
    with pytest.raises(SpecsearchError, match="a mark is one of"):
        ss.open_store(store).mark([ids[0]], "meh")


def test_the_report_ranks_after_triage_and_lists_more_like_this(night3, tmp_path):
    store, kind = night3
    api = ss.open_store(store)
    # the top 50 held five carbon stars before they were marked boring (first test)
    result = api.report("DR3", tmp_path / "report", top=50)
    html = result.html.read_text()
    assert "Ranked after triage" in html and "More like this" in html
    table = pq.read_table(result.parquet)
    assert table.column("adjusted_rank").to_pylist() == list(range(1, 51))
    assert not any(kind[i] == "carbon_star" for i in table.column("source_id").to_pylist())
