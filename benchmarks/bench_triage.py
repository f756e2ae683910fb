"""Triage benchmark: mark 5 stars of one anomaly class boring; does the class leave the top 50,
and do the other classes keep their recall?

Runs on the store of benchmarks/bench_anomaly.py (a clean 20,000-star reference and a new
20,000-star release with 50 anomalies of each of 8 simulated classes; run that first). For each
class: the 5 highest-ranked members of the class are marked boring (as a user looking at the
report would), the release is ranked again after triage, and the table gives the class's count
in the top 50 before and after, and every other class's recall in the top 400 (the number of
anomalies) before and after. The marks are removed afterwards.

    python benchmarks/bench_triage.py [--work /tmp/bench-anomaly]

Prints a table and writes benchmarks/results/triage.json.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RELEASE = "NEW"
TOP = 50
MARKED = 5


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-anomaly"))
    args = parser.parse_args(argv)

    import pyarrow.parquet as pq

    from specsearch.query.triage import mark, triaged
    from specsearch.store import Store

    store = Store.open(args.work / "store")
    truth = pq.read_table(args.work / f"sim-{RELEASE}" / "truth.parquet").to_pydict()
    kind = dict(zip(truth["source_id"], truth["anomaly_class"], strict=True))
    classes = sorted(set(kind.values()) - {"normal"})
    n_anomalies = sum(c != "normal" for c in kind.values())

    def ranked() -> list[str]:
        table = triaged(store, RELEASE)
        return [kind[i] for i in table.column("source_id").to_pylist()]

    saved = store.marks_path().read_bytes() if store.marks_path().exists() else None
    rows = {}
    try:
        store.marks_path().unlink(missing_ok=True)
        before = ranked()
        before_ids = triaged(store, RELEASE).column("source_id").to_pylist()
        for name in classes:
            store.marks_path().unlink(missing_ok=True)
            chosen = [i for i, c in zip(before_ids, before, strict=True) if c == name][:MARKED]
            mark(store, chosen, "boring", note="benchmark", user="bench")
            after = ranked()
            recall = {
                other: (
                    round(before[:n_anomalies].count(other) / before.count(other), 3),
                    round(after[:n_anomalies].count(other) / after.count(other), 3),
                )
                for other in classes
                if other != name
            }
            rows[name] = {
                "top50_before": Counter(before[:TOP])[name],
                "top50_after": Counter(after[:TOP])[name],
                "other_recall_top400_before_after": recall,
                "largest_recall_drop": round(max(b - a for b, a in recall.values()), 3),
            }
    finally:
        store.marks_path().unlink(missing_ok=True)
        if saved is not None:
            store.marks_path().write_bytes(saved)
    print(
        f"| marked class | in top {TOP} before | after | other classes: largest recall drop in top {n_anomalies} |"
    )
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['top50_before']} | {r['top50_after']} | {r['largest_recall_drop']:+.3f} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "triage.json").write_text(
        json.dumps(
            {
                "benchmark": "triage",
                "data": "the bench_anomaly store (SIMULATED LRS, emulated XP)",
                "marked_per_class": MARKED,
                "top": TOP,
                "classes": rows,
                "command": "python benchmarks/bench_triage.py " + " ".join(argv or []),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS / 'triage.json'}")


if __name__ == "__main__":
    main()
