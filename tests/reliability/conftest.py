"""Fixtures of the fault suite: a scored copy of the demo store per test."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture
def store(demo_run, tmp_path):
    """A private copy of the demo's store (two releases, embedded, indexed, scored)."""
    out, _, _ = demo_run
    copy = tmp_path / "store"
    shutil.copytree(out / "store", copy)
    (copy / ".lock").unlink(missing_ok=True)
    return copy


@pytest.fixture
def probe_id(demo_run):
    """A star of the demo with both modalities."""
    _, result, _ = demo_run
    return int(result.top.column("source_id")[0].as_py())
