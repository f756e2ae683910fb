"""Copy the evaluation summary (benchmarks/results/evaluate.json) into a model's card.json.

python scripts/card_metrics.py specsearch/models/weights/specclip-small-v1
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def summary(evaluation: dict) -> dict:
    labels = evaluation["labels"]["per_label"]
    sim, real = evaluation["simulated_pairs"], evaluation["real_xp_pairs"]
    return {
        "command": "python benchmarks/evaluate.py --model default --n-retrieval 10000 --threads 1",
        "xp_labels_real_test_split": {
            label: {
                "robust_sigma": round(v["specclip_xp_head"]["sigma"], 4),
                "bias": round(v["specclip_xp_head"]["bias"], 4),
                "within_1_sigma": round(v["specclip_xp_head"]["calib_frac_sigma_pred"], 3),
                "n": v["specclip_xp_head"]["n"],
                "baseline_pca_hgbr_sigma": round(v["baseline_pca_hgbr"]["sigma"], 4),
                "baseline_mlp_sigma": round(v["baseline_mlp"]["sigma"], 4),
            }
            for label, v in labels.items()
        },
        "retrieval_simulated_test_10000": {
            direction: {k: sim["retrieval"][direction][k] for k in ("top1", "top10", "median_rank")}
            for direction in ("lrs_to_xp", "xp_to_lrs")
        },
        "retrieval_real_xp_test": {
            direction: {k: round(real["retrieval"][direction][k], 4) for k in ("top1", "top10")}
            for direction in ("lrs_to_xp", "xp_to_lrs")
        },
        "chi2_per_pixel_median_simulated": {
            k: round(v["median"], 3) for k, v in sim["chi2_per_pixel"].items()
        },
        "note": "LRS figures use SIMULATED LAMOST spectra; XP labels use real Gaia XP + APOGEE",
    }


def main() -> None:
    model_dir = Path(sys.argv[1])
    evaluation = json.loads((ROOT / "benchmarks" / "results" / "evaluate.json").read_text())
    card_path = model_dir / "card.json"
    card = json.loads(card_path.read_text())
    card["metrics"] = summary(evaluation)
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card["metrics"], indent=2))


if __name__ == "__main__":
    main()
