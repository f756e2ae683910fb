"""What a one-off command imports: `search --source-id` and `sql` start in a fresh process many
times a day, so they load only what they use (issue 12: a first result within 0.3 s)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from specsearch.indexes import build_store_indexes

from .test_sql import store  # noqa: F401 - the fixture: two releases, xp + lrs embeddings

# torch, pandas and friends cost 0.3-2 s each to import; none is needed to look a star up
NEVER = ("torch", "pandas", "matplotlib", "sklearn", "scipy", "astropy", "pyarrow.dataset")

PROBE = """
import json, sys
from specsearch.cli.app import main
sys.argv = ["specsearch", *sys.argv[1:]]
try:
    main()
except SystemExit as done:
    code = done.code
else:
    code = 0
print(json.dumps({"exit": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def imported_by(*args: str) -> tuple[str, set[str]]:
    """(stdout, the modules loaded) of `specsearch ARGS` in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120
    )
    report = json.loads(done.stderr.strip().splitlines()[-1])
    assert report["exit"] == 0, done.stderr
    return done.stdout, set(report["modules"])


def roots(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return [name for name in names if name in modules]


@pytest.fixture
def indexed(store):  # noqa: F811
    build_store_indexes(store, modality="xp")
    return store


def test_search_by_id_imports_no_heavy_module(indexed):
    out, modules = imported_by(
        "search", "--store", str(indexed.root), "--source-id", "105", "-k", "3", "--format", "csv"
    )
    lines = out.strip().splitlines()
    assert lines[0].startswith("query_id,") and len(lines) == 4
    assert {int(line.split(",")[3]) for line in lines[1:]} <= set(range(100, 150)) - {105}
    assert roots(modules, NEVER) == []
    # nor DuckDB (the output is written from Arrow) nor rich (no table, no progress bar)
    assert roots(modules, ("duckdb", "rich")) == []
    assert "faiss" in modules  # the index is what answers


def test_search_table_output_loads_rich_but_nothing_heavy(indexed):
    out, modules = imported_by("search", "--store", str(indexed.root), "--source-id", "105")
    assert "nearest XP neighbours" in out
    assert roots(modules, NEVER + ("duckdb",)) == []


def test_sql_imports_no_heavy_module(store):  # noqa: F811
    out, modules = imported_by(
        "sql", "--store", str(store.root), "SELECT count(*) AS n FROM embeddings", "--format", "csv"
    )
    assert out.splitlines()[:2] == ["n", "60"]
    assert roots(modules, NEVER + ("faiss", "pyarrow.compute")) == []


def test_search_without_pandas_matches_the_library(indexed):
    """The light path (row groups by id statistics, a lookup instead of a join) gives the
    library's answer: the neighbours and their catalog rows (the star's current release)."""
    from specsearch.query.search import search

    table = search(indexed, source_ids=np.array([105, 140]), k=3)
    assert table.column("query_id").to_pylist() == [105] * 3 + [140] * 3
    assert 105 not in table.column("neighbor_id").to_pylist()[:3]
    neighbours = table.column("neighbor_id").to_pylist()
    releases = dict(zip(neighbours, table.column("release").to_pylist(), strict=True))
    assert all(release == ("DR1" if i < 130 else "DR2") for i, release in releases.items())
    assert table.column("teff").to_pylist() == [5000.0] * 6
