"""`specsearch demo`: the main job on the bundled sample, writing only under ``out``.

ingest the bundled release -> embed with the shipped model -> build the FAISS indexes -> one
in-modal and one cross-modal search with the neighbours' labels -> one SQL query.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from rich.console import Console

from .errors import SpecsearchError

SAMPLE_RELEASE = "DR1"


def sample_dir() -> Path:
    """The bundled sample's folder of canonical shards (release DR1 and the smaller DR2)."""
    path = Path(str(resources.files("specsearch") / "data" / "sample"))
    if not path.exists():
        raise SpecsearchError(f"{path}: the bundled sample is missing from this installation")
    return path


def _pick_query(store_root: Path) -> int:
    """A star of the sample with both spectra and reference labels, chosen deterministically."""
    from .store import Store

    table = (
        Store(store_root, create=False)
        .shards(SAMPLE_RELEASE)
        .to_table(columns=["source_id", "lrs_flux", "xp_flux", "teff", "fe_h"])
    )
    both = pc.and_(pc.is_valid(table.column("lrs_flux")), pc.is_valid(table.column("xp_flux")))
    both = pc.and_(both, pc.is_valid(table.column("fe_h")))
    ids = np.sort(table.filter(both).column("source_id").to_numpy())
    if ids.size == 0:
        raise SpecsearchError("the bundled sample holds no star with both spectra and labels")
    return int(ids[len(ids) // 2])


def run_demo(out: Path, console: Console | None = None) -> dict:
    """Run the demo into ``out``; prints each step and returns the timings (s) per step."""
    from .embed import embed_store
    from .indexes import build_store_indexes
    from .ingest import ingest
    from .output import emit_relation, emit_table
    from .search import search
    from .sql import connect

    console = console or Console()
    out = Path(out)
    store = out / "store"
    timings: dict[str, float] = {}
    start = time.perf_counter()

    def step(name: str, func, *args, **kwargs):
        t0 = time.perf_counter()
        result = func(*args, **kwargs)
        timings[name] = time.perf_counter() - t0
        if isinstance(result, str):
            console.print(f"[bold]{name}[/bold] ({timings[name]:.1f} s): {result}")
        return result

    source = sample_dir() / f"release={SAMPLE_RELEASE}"
    step("ingest", ingest, source, store, SAMPLE_RELEASE)
    step("embed", embed_store, store)
    step("index", build_store_indexes, store)

    query = _pick_query(store)
    con = connect(store)
    own = con.execute(
        "SELECT teff, logg, fe_h, alpha_m FROM shards WHERE source_id = ?", [query]
    ).fetchall()[0]
    console.print(
        f"query star {query}: Teff {own[0]:.0f} K, log g {own[1]:.2f}, [Fe/H] {own[2]:+.2f}, "
        f"[alpha/M] {own[3]:+.2f} (APOGEE)",
        markup=False,
    )
    for modality, target in (("xp", "xp"), ("lrs", "xp")):
        t0 = time.perf_counter()
        table = search(store, source_ids=np.array([query]), modality=modality, target=target, k=5)
        timings[f"search {modality}->{target}"] = time.perf_counter() - t0
        keep = ["rank", "neighbor_id", "similarity", "teff", "logg", "fe_h", "alpha_m"]
        emit_table(
            table.select(keep),
            "table",
            title=f"5 nearest XP stars to source_id {query} from its {modality.upper()} spectrum",
        )

    t0 = time.perf_counter()
    sql = (
        "SELECT e.modality, count(*) AS stars, "
        "round(median(abs(e.pred_teff - s.teff)), 1) AS median_abs_dteff_K, "
        "round(median(abs(e.pred_fe_h - s.fe_h)), 3) AS median_abs_dfeh "
        "FROM embeddings e JOIN shards s USING (source_id) GROUP BY 1 ORDER BY 1"
    )
    console.print(f"[bold]sql[/bold]: {sql}")
    console.print(
        "(the bundled stars come from the training split: this checks the pipeline, "
        "it is not a test-set figure; see benchmarks/evaluate.py)"
    )
    emit_relation(con.sql(sql), "table", summary=False)
    timings["sql"] = time.perf_counter() - t0
    total = time.perf_counter() - start
    console.print("anomaly scores and the report come with the scoring stage (not built yet)")
    console.print(
        f"demo done in {total:.1f} s; store at {store} "
        "(try: specsearch sql --store " + str(store) + ' "SELECT * FROM embeddings LIMIT 5")'
    )
    timings["total"] = total
    return timings
