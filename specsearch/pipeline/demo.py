"""`specsearch demo`: the main job on the bundled sample, writing only under ``out``.

Two nights of a survey: the bundled release DR1 (2,000 stars) and then DR2 (400 more) each go
through ``nightly`` (ingest, embed, index, score, report); then the top anomalies of DR2 with
their explanations, one similarity search from a flagged star, one SQL query joining scores,
labels and the catalog, and the paths of the reports.

``run_demo`` returns a ``DemoResult``; what it has to show (each step's one-line result as it
finishes, the tables) goes to the ``show`` callback (the CLI passes its console's print).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import SpecsearchError

RELEASES = ("DR1", "DR2")
TOP = 25
"""Stars shown in detail in each demo report (nightly's default is 50)."""

SQL = """SELECT s.rank, s.source_id, round(s.score, 1) AS score, s.driver,
       round(c.teff) AS teff, round(l.pred_teff) AS teff_xp
FROM scores s
JOIN shards c USING (source_id)
LEFT JOIN labels l ON l.source_id = s.source_id AND l.modality = 'xp'
WHERE s.release = 'DR2' AND s.score >= 2.5
ORDER BY s.rank LIMIT 10"""


def sample_dir() -> Path:
    """The bundled sample's folder of canonical shards (release DR1 and the smaller DR2)."""
    path = Path(str(resources.files("specsearch") / "data" / "sample"))
    if not path.exists():
        raise SpecsearchError(f"{path}: the bundled sample is missing from this installation")
    return path


@dataclass
class DemoResult:
    """What the demo ran: each night's result, the top anomalies, the search and the SQL."""

    store: Path
    nights: dict[str, Any] = field(default_factory=dict)
    top: pa.Table | None = None
    query_id: int | None = None
    search: pa.Table | None = None
    sql: str = SQL
    sql_result: pa.Table | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        reports = ", ".join(str(n.report) for n in self.nights.values())
        return (
            f"demo done in {self.timings.get('total', 0.0):.1f} s; store at {self.store}; "
            f"reports: {reports}"
        )


def run_demo(out: Path, show: Callable[[Any], None] | None = None) -> DemoResult:
    """Run the demo into ``out``. ``show`` receives lines (str) and rich tables as they come."""
    from ..query.output import arrow_rich_table
    from ..query.search import search
    from ..query.sql import connect
    from .nightly import nightly

    show = show or (lambda _: None)
    out = Path(out)
    result = DemoResult(store=out / "store")
    start = time.perf_counter()
    for release in RELEASES:
        t0 = time.perf_counter()
        night = nightly(sample_dir() / f"release={release}", result.store, release, top=TOP)
        result.timings[f"nightly {release}"] = time.perf_counter() - t0
        result.nights[release] = night
        show(f"nightly {release} ({result.timings[f'nightly {release}']:.1f} s): {night}")

    con = connect(result.store)
    result.top = con.sql(
        "SELECT rank, source_id, score, modality_tag, explanation "
        "FROM scores WHERE release = 'DR2' ORDER BY rank LIMIT 8"
    ).to_arrow_table()
    show("The strangest stars of DR2, and why (score = -log10 p against the DR1 reference):")
    for row in result.top.to_pylist():
        show(
            f"  #{row['rank']} {row['source_id']}  score {row['score']:.1f}  "
            f"[{row['modality_tag']}]  {row['explanation']}"
        )

    # a similarity search from the strangest DR2 star with both spectra: who looks like it?
    t0 = time.perf_counter()
    both = con.execute(
        "SELECT source_id FROM scores WHERE release = 'DR2' AND n_components >= 9 "
        "ORDER BY rank LIMIT 1"
    ).fetchall()
    if both:
        result.query_id = int(both[0][0])
        table = search(result.store, source_ids=np.array([result.query_id]), modality="xp", k=5)
        result.search = table.select(
            ["rank", "neighbor_id", "similarity", "release", "teff", "logg", "fe_h"]
        )
        result.timings["search"] = time.perf_counter() - t0
        show(
            arrow_rich_table(
                result.search,
                f"5 nearest XP stars to the strangest DR2 star, source_id {result.query_id}",
            )
        )

    t0 = time.perf_counter()
    show("sql: " + " ".join(SQL.split()))
    result.sql_result = con.sql(SQL).to_arrow_table()
    result.timings["sql"] = time.perf_counter() - t0
    show(arrow_rich_table(result.sql_result, "DR2 anomalies joined with catalog and labels"))
    show(
        "(DR1 is the reference the scores are calibrated on; the LRS spectra are simulated, "
        "the XP spectra real Gaia DR3: see specsearch/data/sample/README.md)"
    )
    result.timings["total"] = time.perf_counter() - start
    show(str(result))
    return result
