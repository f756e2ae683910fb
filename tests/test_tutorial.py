"""docs/tutorial.ipynb runs from top to bottom against the bundled sample (and is kept with
its outputs cleared)."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "tutorial.ipynb"


def test_the_notebook_is_kept_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert len(code) >= 6
    assert all(not cell.outputs and cell.execution_count is None for cell in code)


def test_the_notebook_runs(demo_run, tmp_path, monkeypatch):
    out, _, _ = demo_run
    store = tmp_path / "store"
    shutil.copytree(out / "store", store)  # the tutorial marks a star: a copy takes it
    monkeypatch.setenv("SPECSEARCH_TUTORIAL_STORE", str(store))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()
    outputs = [cell.outputs for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not any(o.output_type == "error" for o in cell) for cell in outputs)
    text = "\n".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
        for cell in outputs
        for o in cell
    )
    assert "injected anomalies among 400 DR2 stars" in text
    images = sum("image/png" in o.get("data", {}) for cell in outputs for o in cell)
    html = sum("text/html" in o.get("data", {}) for cell in outputs for o in cell)
    assert images >= 1 and html >= 4  # the star and the search draw themselves; tables render
    assert "marked boring" in text
