"""Copy the evaluation summary (benchmarks/results/evaluate.json) into a model's card.json.

python scripts/card_metrics.py specsearch/models/weights/specclip-small-v2 [EVALUATION_JSON]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def round_trip(result: dict) -> dict:
    """The file round trip's figures, as written and re-calibrated."""
    return {
        name: {
            "n": result[name]["n"],
            "identical_rows": result[name]["identical_rows"],
            "cosine_median": round(result[name]["cosine"]["median"], 6),
            "teff_shift_over_sigma_median": round(
                result[name]["teff_shift_over_sigma"]["median"], 4
            ),
            "bias_difference": {
                label: round(v["bias_difference"], 4) for label, v in result[name]["labels"].items()
            },
            "lrs_bias_files": {
                label: round(v["files"]["bias"], 4) for label, v in result[name]["labels"].items()
            },
        }
        for name in ("as_written", "recalibrated")
    }


def summary(evaluation: dict, command: str) -> dict:
    labels = evaluation["labels"]["per_label"]
    sim, real = evaluation["simulated_pairs"], evaluation["real_xp_pairs"]
    near = sim["retrieval"].get("neighbour_label_distance")
    extra = {}
    if near:
        extra["top10_median_label_distance_simulated"] = {
            key: {label: round(v, 4) for label, v in near[key].items()}
            for key in ("lrs_to_xp", "xp_to_lrs", "oracle")
        }
    if "labels" in sim:
        extra["label_bias_sigma_simulated"] = {
            modality: {
                label: {"bias": round(v["bias"], 4), "sigma": round(v["sigma"], 4)}
                for label, v in per_label.items()
            }
            for modality, per_label in sim["labels"].items()
        }
    if "file_round_trip" in evaluation:
        extra["file_round_trip"] = round_trip(evaluation["file_round_trip"])
    return {
        "command": command,
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
        **extra,
        "note": "LRS figures use SIMULATED LAMOST spectra; XP labels use real Gaia XP + APOGEE",
    }


def main() -> None:
    model_dir = Path(sys.argv[1])
    source = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "benchmarks" / "results"
    source = source / "evaluate.json" if source.is_dir() else source
    evaluation = json.loads(source.read_text())
    card_path = model_dir / "card.json"
    card = json.loads(card_path.read_text())
    command = (
        f"python benchmarks/evaluate.py --model {model_dir.name} --n-retrieval "
        f"{evaluation['simulated_pairs']['n_test_pairs']} --threads {evaluation['args']['threads']}"
    )
    card["metrics"] = summary(evaluation, command)
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card["metrics"], indent=2))


if __name__ == "__main__":
    main()
