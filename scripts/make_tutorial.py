"""Write docs/tutorial.ipynb (outputs cleared): the notebook tour of specsearch's Python API.

    python scripts/make_tutorial.py

The notebook is executed by tests/test_tutorial.py against the bundled sample.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

OUT = Path(__file__).resolve().parents[1] / "docs" / "tutorial.ipynb"

CELLS = [
    (
        "md",
        """# specsearch in a notebook

A tour of the Python API on the bundled sample: two nights of a small survey (2,000 stars,
then 400 more; real Gaia DR3 XP spectra, **simulated** LAMOST LRS) already run through
`specsearch nightly`. We open the store, look at the strangest stars of the second night and why
they were flagged, find stars like one of them, mark what we do not care about, join the scores
with a catalog in SQL, and plot.

Every call here is the twin of a `specsearch` command (`store.search` is `specsearch search`,
and so on).""",
    ),
    (
        "code",
        """import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt

import specsearch as ss
from specsearch.pipeline.demo import sample_dir

# the store `specsearch demo` writes; made here (about a minute) when none is given
STORE = os.environ.get("SPECSEARCH_TUTORIAL_STORE")
if STORE is None:
    STORE = Path(tempfile.mkdtemp()) / "store"
    ss.demo(STORE.parent)
store = ss.open_store(STORE)
store""",
    ),
    (
        "md",
        "## The strangest stars of the second night\n\n`score` is `-log10 p` against the first night (the frozen reference): 3 means rarer than one reference star in a thousand.",
    ),
    (
        "code",
        """top = store.scores("DR2", top=10)
top.to_pandas()[["adjusted_rank", "source_id", "score", "driver", "modality_tag", "explanation"]]""",
    ),
    (
        "md",
        "## Why was the first one flagged?\n\nIts observed spectra (black), the model's reconstructions (blue) and its predictions from the other spectrum (orange), the residuals in sigma, the flagged wavelength ranges and each component's p-value.",
    ),
    (
        "code",
        """first = int(top.table.column("source_id")[0].as_py())
star = store.show(first)
print(star.view.score["explanation"])
star""",
    ),
    (
        "md",
        "## Stars like it\n\nThe nearest stars in the XP embedding space, their spectra overlaid on its own.",
    ),
    (
        "code",
        """like = store.search(source_id=first, k=5)
like""",
    ),
    (
        "md",
        "## Triage: mark what you do not care about\n\nMarks are kept in the store; the stored scores never change, but the ranking of this and every later night pushes the marked star, and stars like it, down (the reason is in `triage`).",
    ),
    (
        "code",
        """store.mark([first], "boring", note="seen this kind before")
after = store.scores("DR2", top=10).to_pandas()
after[["adjusted_rank", "rank", "source_id", "score", "adjusted_score", "mark", "triage"]]""",
    ),
    (
        "md",
        "## SQL: scores joined with labels and a catalog\n\nAny Parquet, CSV, FITS, ECSV or VOTable file can be attached as a view. Here the sample's truth table: which stars carry an injected anomaly.",
    ),
    (
        "code",
        """truth = sample_dir() / "truth.parquet"
joined = store.sql(
    \"\"\"SELECT s.rank, s.source_id, round(s.score, 2) AS score, s.modality_tag,
              round(l.pred_teff) AS teff_xp, t.anomaly_class
       FROM scores s
       JOIN labels l ON l.source_id = s.source_id AND l.modality = 'xp'
       JOIN truth t ON t.source_id = s.source_id
       WHERE s.release = 'DR2' ORDER BY s.rank LIMIT 10\"\"\",
    attach={"truth": truth},
).df()
joined""",
    ),
    ("md", "## Plot: scores of normal and anomalous stars"),
    (
        "code",
        """scores = store.sql(
    "SELECT s.score, t.anomaly_class <> 'normal' AS injected FROM scores_history s "
    "JOIN truth t USING (source_id) WHERE s.release = 'DR2'",
    attach={"truth": truth},
).df()
fig, ax = plt.subplots(figsize=(6, 3))
ax.hist([scores.score[~scores.injected], scores.score[scores.injected]], bins=30, log=True,
        stacked=True, label=["normal", "injected anomaly"])
ax.set_xlabel("score = -log10 p (against DR1)")
ax.set_ylabel("stars")
ax.legend()
print(f"{int(scores.injected.sum())} injected anomalies among {len(scores)} DR2 stars")""",
    ),
]


def main() -> None:
    notebook = new_notebook()
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    for kind, source in CELLS:
        notebook.cells.append(new_markdown_cell(source) if kind == "md" else new_code_cell(source))
    OUT.write_text(nbformat.writes(notebook))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
