"""SQL and -o cannot change the store or reach other files; -o writes the format its suffix names."""

from __future__ import annotations

import csv
import json

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from specsearch.cli.app import app
from specsearch.files import file_sha256

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def snapshot(store):
    return {p: file_sha256(p) for p in store.rglob("*") if p.is_file() and p.name != ".lock"}


def one_line_error(result, code=2):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "query",
    [
        "COPY (SELECT 1 AS x) TO '{store}/manifest.json' (FORMAT csv)",
        "COPY (SELECT * FROM shards LIMIT 10) TO '{shard}' (FORMAT parquet)",
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM read_csv('/etc/passwd')",
        "ATTACH '{store}/x.db' AS x",
        "INSTALL httpfs",
        "LOAD httpfs",
        "CREATE TABLE t AS SELECT 1",
        "SET enable_external_access = true",
        "SELECT 1; COPY (SELECT 1) TO '{store}/manifest.json'",
        "PRAGMA database_list",
        "EXPORT DATABASE '{store}/export'",
    ],
)
def test_sql_cannot_write_or_read_outside(store, query):
    shard = next((store / "shards" / "release=DR1").glob("part-*.parquet"))
    before = snapshot(store)
    result = run("sql", "--store", store, query.format(store=store, shard=shard))
    line = one_line_error(result)
    assert line.startswith("error: SQL"), line
    assert snapshot(store) == before
    count = run("sql", "--store", store, "SELECT count(*) AS n FROM shards", "--format", "csv")
    assert count.exit_code == 0 and count.stdout.split() == ["n", "2400"]


def test_sql_reads_attached_files_only(store, tmp_path):
    catalog = tmp_path / "cat.csv"
    catalog.write_text("source_id,flag\n1,a\n2,b\n")
    result = run(
        "sql", "--store", store, "--attach", f"cat={catalog}", "SELECT count(*) AS n FROM cat",
        "--format", "csv",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == ["n", "2"]
    other = tmp_path / "other.csv"
    other.write_text("a\n1\n")
    result = run(
        "sql", "--store", store, "--attach", f"cat={catalog}", f"SELECT * FROM read_csv('{other}')"
    )
    one_line_error(result)


@pytest.mark.parametrize("command", ["sql", "search"])
def test_output_never_inside_the_store(store, probe_id, command):
    before = snapshot(store)
    targets = [store / "manifest.json", next((store / "shards" / "release=DR1").iterdir())]
    for target in targets:
        if command == "sql":
            result = run("sql", "--store", store, "SELECT 1 AS x", "-o", target)
        else:
            result = run("search", "--store", store, "--source-id", probe_id, "-o", target)
        line = one_line_error(result)
        assert "may not write inside the store" in line
    assert snapshot(store) == before


def test_output_format_follows_the_suffix(store, tmp_path):
    query = "SELECT source_id, teff FROM shards ORDER BY source_id LIMIT 7"
    result = run("sql", "--store", store, query, "-o", tmp_path / "x.parquet")
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "x.parquet")
    assert table.num_rows == 7 and table.column_names == ["source_id", "teff"]
    result = run("sql", "--store", store, query, "-o", tmp_path / "x.csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "x.csv")))
    assert len(rows) == 7 and int(rows[0]["source_id"]) == table.column("source_id")[0].as_py()
    result = run("sql", "--store", store, query, "-o", tmp_path / "x.json")
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "x.json").read_text())) == 7
    line = one_line_error(run("sql", "--store", store, query, "-o", tmp_path / "x.xlsx"))
    assert "x.xlsx" in line and "suffix" in line
    assert not (tmp_path / "x.xlsx").exists()
