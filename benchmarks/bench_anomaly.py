"""Anomaly detection benchmark: the combined score and each component against baselines.

A simulated survey: a clean reference release (no anomalies) and a new release of the same size
with 2% anomalies of every simulator class (LRS simulated, XP emulated: see docs/simulator.md).
Both go through ingest, embed and index build; the new release is scored against the reference
(`specsearch score`). The truth table is read only here, to evaluate, never by the score.

Per class and overall: AUROC (the class against the normal stars), average precision and
precision@100, of the combined score, of each component alone (its -log10 p), and of baselines
fitted on the reference release and applied to the new one:

- Isolation Forest on the raw concatenated spectra (continuum-normalised LRS + XP / its norm);
- PCA reconstruction error on the same raw spectra (50 components, residual in sigma);
- local outlier factor on the embeddings (LRS and XP concatenated, novelty mode, k=20).

Also: the combinations of the components the score could use (Fisher's sum, chosen; the
largest component, i.e. the smallest p; the harmonic mean of p; the sum of the three largest),
each ranked on its own; the calibration (normal stars at or above each score, against the
number a p-value promises); AUROC per S/N tercile (the LRS median S/N per pixel) and the
scoring throughput.

    python benchmarks/bench_anomaly.py [--n 20000] [--work /tmp/bench-anomaly]

The simulated and embedded stores are kept under --work and reused (delete it to start afresh);
the scores are always computed afresh. Prints the tables and writes
benchmarks/results/anomaly.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
CLASSES = (
    "binary",
    "carbon_star",
    "cross_match",
    "dead_fibre",
    "emission_line",
    "flux_tilt",
    "metal_poor",
    "xp_corrupted",
)
REFERENCE, NEW = "REF", "NEW"
SEEDS = {REFERENCE: 101, NEW: 202}


def build_store(work: Path, n: int, model: str) -> Path:
    """Simulate, ingest, embed and index both releases (skipped when already there)."""
    from specsearch.indexes import build_store_indexes
    from specsearch.pipeline.embed import embed_store
    from specsearch.pipeline.ingest import ingest
    from specsearch.sim.simulate import simulate_release
    from specsearch.store import Store

    store = work / "store"
    for release, fraction in ((REFERENCE, 0.0), (NEW, 0.02)):
        sim = work / f"sim-{release}"
        if not (sim / "truth.parquet").exists():
            print(
                simulate_release(
                    sim, n=n, seed=SEEDS[release], release=release, anomaly_fraction=fraction
                )
            )
        if not (store / "manifest.json").exists() or release not in Store(store).releases():
            print(
                ingest(sim / "shards" / f"release={release}", store, release, show_progress=False)
            )
    print(embed_store(store, model=model, show_progress=False))
    if "indexes" not in Store(store).read_manifest():
        print(build_store_indexes(store, show_progress=False))
    return store


def truth(work: Path) -> dict[int, str]:
    import pyarrow.parquet as pq

    table = pq.read_table(work / f"sim-{NEW}" / "truth.parquet")
    return dict(
        zip(
            table.column("source_id").to_pylist(),
            table.column("anomaly_class").to_pylist(),
            strict=True,
        )
    )


def metrics(labels: np.ndarray, classes: np.ndarray, values: np.ndarray) -> dict:
    """AUROC, AP and precision@100 overall and per class (class vs normal stars)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    values = np.where(np.isfinite(values), values, -np.inf)
    values = np.where(np.isinf(values), np.nanmin(values[np.isfinite(values)]) - 1, values)
    out = {"overall": _one(labels, values, roc_auc_score, average_precision_score)}
    for name in CLASSES:
        keep = (classes == name) | ~labels
        out[name] = _one(labels[keep], values[keep], roc_auc_score, average_precision_score)
    return out


def _one(labels, values, roc, ap) -> dict:
    top = np.argsort(-values, kind="stable")[:100]
    return {
        "auroc": round(float(roc(labels, values)), 4),
        "ap": round(float(ap(labels, values)), 4),
        "p@100": round(float(labels[top].mean()), 3),
    }


def combination_metrics(table, labels: np.ndarray, classes: np.ndarray) -> dict:
    """The components' -log10 p combined in other ways, ranked alone (calibration is monotone,
    so it does not change a ranking)."""
    from specsearch.pipeline.calibration import combine_logp
    from specsearch.pipeline.score import COMPONENTS

    logp = np.stack(
        [table.column(f"{c}_logp").to_numpy(zero_copy_only=False) for c in COMPONENTS], axis=1
    ).astype(np.float64)
    filled = np.nan_to_num(logp, nan=0.0)
    ordered = -np.sort(-filled, axis=1)
    candidates = {
        "Fisher: sum of -log10 p (chosen)": filled.sum(axis=1),
        "smallest p (largest -log10 p)": ordered[:, 0],
        "harmonic mean of p": combine_logp(logp),
        "sum of the three smallest p": ordered[:, :3].sum(axis=1),
    }
    return {name: metrics(labels, classes, values) for name, values in candidates.items()}


def raw_spectra(store, release: str) -> tuple[np.ndarray, np.ndarray]:
    """(source_id, X): continuum-normalised LRS with the XP divided by its norm, bad pixels
    filled with 1 (LRS) / the median (XP): the features the raw-spectrum baselines use."""
    from specsearch.grids import xp_norm
    from specsearch.schema import column_matrix

    table = store.shards(release).to_table(columns=["source_id", "lrs_flux", "lrs_ivar", "xp_flux"])
    lrs, ivar = column_matrix(table, "lrs_flux"), column_matrix(table, "lrs_ivar")
    lrs = np.where((ivar > 0) & np.isfinite(lrs), lrs, 1.0)
    xp = column_matrix(table, "xp_flux")
    xp = xp / xp_norm(xp)[:, None]
    xp = np.where(np.isfinite(xp), xp, 0.0)
    return table.column("source_id").to_numpy(), np.hstack([lrs, xp]).astype(np.float32)


def embeddings(store, release: str) -> tuple[np.ndarray, np.ndarray]:
    from specsearch.schema import column_matrix

    parts = []
    for modality in ("lrs", "xp"):
        rows = store.embeddings(modality, release=release, columns=["source_id", "embedding"])
        parts.append((rows.column("source_id").to_numpy(), column_matrix(rows, "embedding")))
    common = np.intersect1d(parts[0][0], parts[1][0])
    vectors = [v[np.searchsorted(i, common)] for i, v in parts]
    return common, np.hstack(vectors)


def baselines(store, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """{name: (source_id, anomaly value, fit + apply seconds)} fitted on the reference."""
    from sklearn.decomposition import PCA
    from sklearn.ensemble import IsolationForest
    from sklearn.neighbors import LocalOutlierFactor

    out = {}
    _, x_ref = raw_spectra(store, REFERENCE)
    ids, x_new = raw_spectra(store, NEW)
    mean, std = x_ref.mean(axis=0), x_ref.std(axis=0) + 1e-6
    z_ref, z_new = (x_ref - mean) / std, (x_new - mean) / std
    t0 = time.perf_counter()
    forest = IsolationForest(n_estimators=200, random_state=seed, n_jobs=-1).fit(z_ref)
    out["isolation_forest_raw"] = (ids, -forest.score_samples(z_new), time.perf_counter() - t0)
    t0 = time.perf_counter()
    pca = PCA(n_components=50, random_state=seed).fit(z_ref)
    residual = z_new - pca.inverse_transform(pca.transform(z_new))
    out["pca_error_raw"] = (ids, np.sqrt((residual**2).mean(axis=1)), time.perf_counter() - t0)
    _, e_ref = embeddings(store, REFERENCE)
    ids_e, e_new = embeddings(store, NEW)
    t0 = time.perf_counter()
    lof = LocalOutlierFactor(n_neighbors=20, novelty=True).fit(e_ref)
    out["lof_embeddings"] = (ids_e, -lof.score_samples(e_new), time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="stars per release")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-anomaly"))
    parser.add_argument("--model", default="default")
    args = parser.parse_args(argv)

    import pyarrow.parquet as pq

    from specsearch.pipeline.score import COMPONENTS, score_store
    from specsearch.store import Store

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    store_path = build_store(work, args.n, args.model)
    store = Store(store_path)
    # scores of an earlier run are dropped: the run measures calibration and scoring afresh
    store.drop_scores()
    t0 = time.perf_counter()
    calibrated = score_store(store, release=REFERENCE, reference=REFERENCE, show_progress=False)
    calibration_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = score_store(store, release=NEW, show_progress=False)
    score_s = time.perf_counter() - t0
    print(calibrated)
    print(result)
    table = pq.read_table(store.score_path(NEW, "scores.parquet"))
    ids = table.column("source_id").to_numpy()
    known = truth(work)
    classes = np.array([known[int(i)] for i in ids])
    labels = classes != "normal"
    columns = {"combined score": table.column("score").to_numpy(zero_copy_only=False)}
    for component in COMPONENTS:
        columns[component] = table.column(f"{component}_logp").to_numpy(zero_copy_only=False)
    rows = {name: metrics(labels, classes, values) for name, values in columns.items()}
    combinations = combination_metrics(table, labels, classes)
    for name, (base_ids, values, seconds) in baselines(store).items():
        order = np.searchsorted(base_ids, ids)
        found = (order < len(base_ids)) & (base_ids[np.minimum(order, len(base_ids) - 1)] == ids)
        aligned = np.full(len(ids), np.nan)
        aligned[found] = values[order[found]]
        rows[name] = metrics(labels, classes, aligned)
        rows[name]["seconds"] = round(seconds, 1)
    # per S/N tercile of the LRS
    snr = table.column("snr_lrs").to_numpy(zero_copy_only=False)
    edges = np.nanquantile(snr, [0, 1 / 3, 2 / 3, 1])
    by_snr = {}
    from sklearn.metrics import roc_auc_score

    for j in range(3):
        inside = (snr >= edges[j]) & (snr <= edges[j + 1])
        key = f"S/N {edges[j]:.0f}-{edges[j + 1]:.0f}"
        by_snr[key] = {
            name: round(float(roc_auc_score(labels[inside], np.nan_to_num(v[inside], nan=-1))), 4)
            for name, v in columns.items()
            if name == "combined score"
        }
        by_snr[key]["anomalies"] = int(labels[inside].sum())
    # the table
    header = ["method", "overall AUROC", "AP", "p@100", *CLASSES]
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, r in rows.items():
        cells = [name, f"{r['overall']['auroc']:.3f}", f"{r['overall']['ap']:.3f}"]
        cells.append(f"{r['overall']['p@100']:.2f}")
        cells += [f"{r[c]['auroc']:.3f}" for c in CLASSES]
        print("| " + " | ".join(cells) + " |")
    print("\nCombinations of the components (each ranked alone; the score uses Fisher's sum):")
    print("| combination | overall AUROC | AP | p@100 | " + " | ".join(CLASSES) + " |")
    print("|" + "---|" * (4 + len(CLASSES)))
    for name, r in combinations.items():
        cells = [name, f"{r['overall']['auroc']:.3f}", f"{r['overall']['ap']:.3f}"]
        cells += [f"{r['overall']['p@100']:.2f}", *(f"{r[c]['auroc']:.3f}" for c in CLASSES)]
        print("| " + " | ".join(cells) + " |")
    score = columns["combined score"]
    normal = ~labels
    calibration = {
        str(t): {
            "normal_at_or_above": int(np.sum(score[normal] >= t)),
            "expected_by_chance": round(float(normal.sum() * 10.0**-t), 1),
            "anomalies_at_or_above": int(np.sum(score[labels] >= t)),
        }
        for t in (2, 3, 4, 5)
    }
    print("\nCalibration: normal stars at or above each score (a p-value promises N x 10^-score):")
    for t, c in calibration.items():
        print(
            f"  score >= {t}: {c['normal_at_or_above']} normal (expected {c['expected_by_chance']}),"
            f" {c['anomalies_at_or_above']} of {int(labels.sum())} anomalies"
        )
    print("\nAUROC of the combined score per LRS S/N tercile:")
    for key, value in by_snr.items():
        print(f"  {key}: {value['combined score']:.3f} ({value['anomalies']} anomalies)")
    rate = len(ids) / score_s
    print(
        f"\nscoring: {len(ids):,} stars in {score_s:.1f} s ({rate:,.0f} stars/s); "
        f"calibration on {args.n:,} reference stars {calibration_s:.1f} s"
    )
    RESULTS.mkdir(exist_ok=True)
    report = {
        "benchmark": "anomaly",
        "data": "SIMULATED: LRS (specsearch.sim.lrs_synth) + emulated XP; reference release "
        f"{args.n} stars without anomalies, new release {args.n} stars with 2% anomalies",
        "n_per_release": args.n,
        "anomalies": int(labels.sum()),
        "model": result.releases.get(NEW, {}).get("model_id") or args.model,
        "metrics": rows,
        "combinations": combinations,
        "calibration": calibration,
        "auroc_by_snr": by_snr,
        "scoring_stars_per_s": round(rate, 1),
        "scoring_seconds": round(score_s, 2),
        "calibration_seconds": round(calibration_s, 2),
        "machine": platform.platform(),
        "command": "python benchmarks/bench_anomaly.py " + " ".join(argv or []),
    }
    (RESULTS / "anomaly.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS / 'anomaly.json'}")


if __name__ == "__main__":
    main()
