"""The report (HTML, Parquet, CSV), checked in a real browser; the README's SQL examples."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from specsearch.cli.app import app
from specsearch.pipeline.demo import sample_dir
from specsearch.pipeline.report import HEADLESS_CHROMIUM, new_above_threshold
from specsearch.store import Store

README = Path(__file__).resolve().parents[1] / "README.md"


def _truth() -> dict[int, str]:
    table = pq.read_table(sample_dir() / "truth.parquet").to_pydict()
    return dict(zip(table["source_id"], table["anomaly_class"], strict=True))


def test_report_files_and_new_since_section(demo_run):
    out, result, _ = demo_run
    store = Store(out / "store")
    night = result.nights["DR2"]
    html = night.report.read_text()
    assert html.count('<section class="star"') == 25  # the demo's --top
    assert "New since DR1" in html
    fresh = new_above_threshold(store, "DR2", "DR1", store.score_entry("DR2")["threshold"])
    assert night.new_since == fresh.num_rows
    truth = _truth()
    fresh_ids = fresh.column("source_id").to_pylist()
    for source_id in fresh_ids:
        assert f'href="#star-{source_id}"' in html
    # what is new above threshold was mostly injected: the threshold (p ~ 0.003) lets a normal
    # star or two of a release through, by design (11 new, 10 injected with specclip-small-v2)
    injected = sum(truth[source_id] != "normal" for source_id in fresh_ids)
    assert len(fresh_ids) >= 5 and injected >= 0.8 * len(fresh_ids)
    folder = night.report.parent
    table = pq.read_table(folder / "top_anomalies.parquet")
    assert table.num_rows == 25 and table.column("rank").to_pylist() == list(range(1, 26))
    assert {"teff", "xp_pred_teff", "explanation", "score"} <= set(table.column_names)
    csv = pacsv.read_csv(folder / "top_anomalies.csv")
    assert csv.column("source_id").to_pylist() == table.column("source_id").to_pylist()
    assert "<script src" not in html and "http://" not in html and "https://" not in html


def test_report_cli_writes_where_asked(demo_run, tmp_path):
    out, _, _ = demo_run
    result = CliRunner().invoke(
        app,
        [
            "report",
            "--store",
            str(out / "store"),
            "--release",
            "DR2",
            "--out",
            str(tmp_path),
            "--top",
            "3",
            "--since",
            "DR1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "report DR2: top 3 of 400 stars" in result.output
    assert (tmp_path / "report.html").read_text().count('<section class="star"') == 3
    bad = CliRunner().invoke(
        app, ["report", "--store", str(out / "store"), "--release", "DR9", "--out", str(tmp_path)]
    )
    assert bad.exit_code == 2 and "not scored" in bad.output


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    _chromium() is None, reason="chromium is not installed (apt-get install chromium)"
)
def test_report_renders_in_chromium_with_every_image(demo_run, tmp_path):
    out, result, _ = demo_run
    page = result.nights["DR2"].report
    dom = subprocess.run(
        [
            _chromium(),
            *HEADLESS_CHROMIUM,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    match = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert match, "the page's load handler did not run"
    loaded, total = map(int, match.groups())
    assert total == 25 + 3 and loaded == total  # a figure per star, histogram and two bar charts
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            _chromium(),
            *HEADLESS_CHROMIUM,
            f"--user-data-dir={tmp_path / 'profile2'}",
            "--window-size=1280,900",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def readme_sql_commands() -> list[str]:
    text = README.read_text()
    section = text[text.index("## SQL") :]
    section = section[: section.index("\n## ", 4)]
    return [line for line in section.splitlines() if line.startswith("specsearch sql ")]


def test_readme_sql_examples_return_what_they_say(demo_run, monkeypatch):
    import shlex

    out, _, _ = demo_run
    store = Store(out / "store")
    commands = readme_sql_commands()
    assert len(commands) == 3
    monkeypatch.chdir(README.parent)  # the examples name the sample by its repository path
    results = []
    for command in commands:
        argv = shlex.split(command)[1:]
        argv[argv.index("--store") + 1] = str(store.root)
        result = CliRunner().invoke(app, [*argv, "--format", "csv"])
        assert result.exit_code == 0, (command, result.output)
        results.append(list(__import__("csv").DictReader(result.stdout.splitlines())))
    truth = _truth()
    top, per_tag, neighbours = results
    # 1: the top ten of DR2, in rank order, with labels and the attached catalog's class
    assert [int(r["rank"]) for r in top] == list(range(1, 11))
    assert all(r["teff_xp"] and r["anomaly_class"] == truth[int(r["source_id"])] for r in top)
    # 2: the counts per release and tag are those of the score files
    expected = {}
    for release in ("DR1", "DR2"):
        scores = pq.read_table(store.score_path(release, "scores.parquet")).to_pylist()
        for row in scores:
            if row["score"] is not None and row["score"] >= 2.5:
                key = (release, row["modality_tag"])
                expected[key] = expected.get(key, 0) + 1
    assert {(r["release"], r["modality_tag"]): int(r["anomalies"]) for r in per_tag} == expected
    # 3: ten XP neighbours for every DR2 star at or above 2.5, none of them the star itself
    above = {k for k, v in expected.items() if k[0] == "DR2"}
    n_above = sum(expected[k] for k in above)
    assert len(neighbours) == 10 * n_above
    assert all(r["source_id"] != r["neighbor_id"] for r in neighbours)
