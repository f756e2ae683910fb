"""`specsearch demo`: the main job on the bundled sample, writing only under ``out``.

ingest the bundled release -> embed with the shipped model -> build the FAISS indexes -> one
in-modal and one cross-modal search with the neighbours' labels -> one SQL query.

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
import pyarrow.compute as pc

from ..errors import SpecsearchError
from ..store import Store

SAMPLE_RELEASE = "DR1"


def sample_dir() -> Path:
    """The bundled sample's folder of canonical shards (release DR1 and the smaller DR2)."""
    path = Path(str(resources.files("specsearch") / "data" / "sample"))
    if not path.exists():
        raise SpecsearchError(f"{path}: the bundled sample is missing from this installation")
    return path


def _pick_query(store: Store) -> int:
    """A star of the sample with both spectra and reference labels, chosen deterministically."""
    table = store.shards(SAMPLE_RELEASE).to_table(
        columns=["source_id", "lrs_flux", "xp_flux", "teff", "fe_h"]
    )
    both = pc.and_(pc.is_valid(table.column("lrs_flux")), pc.is_valid(table.column("xp_flux")))
    both = pc.and_(both, pc.is_valid(table.column("fe_h")))
    ids = np.sort(table.filter(both).column("source_id").to_numpy())
    if ids.size == 0:
        raise SpecsearchError("the bundled sample holds no star with both spectra and labels")
    return int(ids[len(ids) // 2])


@dataclass
class DemoResult:
    """What the demo ran: each stage's result, the searches and the SQL result, the timings."""

    store: Path
    steps: dict[str, Any] = field(default_factory=dict)
    query_id: int | None = None
    searches: dict[str, pa.Table] = field(default_factory=dict)
    sql: str = ""
    sql_result: pa.Table | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        return (
            f"demo done in {self.timings.get('total', 0.0):.1f} s; store at {self.store} "
            f'(try: specsearch sql --store {self.store} "SELECT * FROM embeddings LIMIT 5")'
        )


def run_demo(out: Path, show: Callable[[Any], None] | None = None) -> DemoResult:
    """Run the demo into ``out``. ``show`` receives lines (str) and rich tables as they come."""
    from ..indexes import build_store_indexes
    from ..query.output import arrow_rich_table
    from ..query.search import search
    from ..query.sql import connect
    from .embed import embed_store
    from .ingest import ingest

    show = show or (lambda _: None)
    out = Path(out)
    result = DemoResult(store=out / "store")
    start = time.perf_counter()

    def step(name: str, func, *args, **kwargs):
        t0 = time.perf_counter()
        value = func(*args, **kwargs)
        result.timings[name] = time.perf_counter() - t0
        result.steps[name] = value
        show(f"{name} ({result.timings[name]:.1f} s): {value}")
        return value

    source = sample_dir() / f"release={SAMPLE_RELEASE}"
    step("ingest", ingest, source, result.store, SAMPLE_RELEASE)
    step("embed", embed_store, result.store)
    step("index", build_store_indexes, result.store)
    store = Store.open(result.store)

    query = result.query_id = _pick_query(store)
    con = connect(store)
    own = con.execute(
        "SELECT teff, logg, fe_h, alpha_m FROM shards WHERE source_id = ?", [query]
    ).fetchall()[0]
    show(
        f"query star {query}: Teff {own[0]:.0f} K, log g {own[1]:.2f}, [Fe/H] {own[2]:+.2f}, "
        f"[alpha/M] {own[3]:+.2f} (APOGEE)"
    )
    for modality, target in (("xp", "xp"), ("lrs", "xp")):
        t0 = time.perf_counter()
        table = search(store, source_ids=np.array([query]), modality=modality, target=target, k=5)
        name = f"search {modality}->{target}"
        result.timings[name] = time.perf_counter() - t0
        keep = ["rank", "neighbor_id", "similarity", "teff", "logg", "fe_h", "alpha_m"]
        result.searches[name] = table.select(keep)
        title = f"5 nearest XP stars to source_id {query} from its {modality.upper()} spectrum"
        show(arrow_rich_table(result.searches[name], title))

    t0 = time.perf_counter()
    result.sql = (
        "SELECT e.modality, count(*) AS stars, "
        "round(median(abs(e.pred_teff - s.teff)), 1) AS median_abs_dteff_K, "
        "round(median(abs(e.pred_fe_h - s.fe_h)), 3) AS median_abs_dfeh "
        "FROM embeddings e JOIN shards s USING (source_id) GROUP BY 1 ORDER BY 1"
    )
    show(f"sql: {result.sql}")
    show(
        "(the bundled stars come from the training split: this checks the pipeline, "
        "it is not a test-set figure; see benchmarks/evaluate.py)"
    )
    result.sql_result = con.sql(result.sql).to_arrow_table()
    show(arrow_rich_table(result.sql_result))
    result.timings["sql"] = time.perf_counter() - t0
    show("anomaly scores and the report come with the scoring stage (not built yet)")
    result.timings["total"] = time.perf_counter() - start
    show(str(result))
    return result
