"""Fixtures shared by the tests and the doctests of the Python API (specsearch/api.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The demo, run once per session: two nights of the bundled sample through nightly."""
    from specsearch.pipeline.demo import run_demo

    out = tmp_path_factory.mktemp("demo") / "out"
    shown = []
    result = run_demo(out, show=shown.append)
    return out, result, shown


@pytest.fixture(autouse=True)
def api_doctest_names(request, doctest_namespace, tmp_path):
    """Names the API's docstring examples use: ``ss``, ``pa``, ``sample`` (the bundled sample's
    folder), ``demo_store`` (a copy of the
    demo's store, so examples that mark stars change no other test's store), ``example_id``
    (the strangest star of its second night) and ``tmp`` (a scratch folder)."""
    from _pytest.doctest import DoctestItem

    if not isinstance(request.node, DoctestItem):
        return
    import shutil

    import pyarrow as pa

    import specsearch as ss

    out, result, _ = request.getfixturevalue("demo_run")
    store = tmp_path / "store"
    shutil.copytree(out / "store", store)
    from specsearch.pipeline.demo import sample_dir

    doctest_namespace.update(
        sample=sample_dir(),
        ss=ss,
        pa=pa,
        demo_store=store,
        example_id=int(result.top.column("source_id")[0].as_py()),
        tmp=tmp_path,
    )
