"""One writer at a time: a second writer waits (or fails at once with --no-wait), manifest
updates from many processes are all kept, and scratch folders are exact per release."""

from __future__ import annotations

import datetime
import multiprocessing
import subprocess
import time

import pyarrow as pa
import pytest

from specsearch.errors import EnvironmentFault
from specsearch.schema import MARKS_SCHEMA
from specsearch.store import LockPolicy, Store
from tests.reliability.harness import CLI, REPO, cli, source_release


def _hold_lock(root, seconds, ready):
    with Store(root).writing("test holder"):
        ready.set()
        time.sleep(seconds)


@pytest.fixture
def held(tmp_path):
    """A store whose writer lock another process holds for 8 s (or until the test ends)."""
    root = tmp_path / "store"
    Store(root)
    # spawned, not forked: a fork of this many-threaded test process (torch, FAISS and Arrow
    # pools) can hang in the child on a lock some thread held at the fork (seen once in 1 suite)
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    holder = context.Process(target=_hold_lock, args=(root, 8.0, ready))
    holder.start()
    assert ready.wait(30)
    yield root
    holder.terminate()
    holder.join()


def test_no_wait_fails_at_once_with_one_line(held, tmp_path):
    source = source_release(tmp_path / "src", 0, 50)
    result = cli("--no-wait", "ingest", str(source), "--store", str(held), "--release", "DR1")
    assert (held / ".lock").read_text().startswith("test holder")  # still held: it did not wait
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "the store is being written by test holder (pid" in lines[0]
    assert "without --no-wait" in lines[0]
    assert Store(held).releases() == []


def test_a_second_writer_waits_and_says_so(held, tmp_path):
    source = source_release(tmp_path / "src", 0, 50)
    start = time.perf_counter()
    result = cli("ingest", str(source), "--store", str(held), "--release", "DR1")
    assert result.returncode == 0, result.stderr
    assert time.perf_counter() - start > 2.0  # it waited for the holder
    assert "waiting for test holder" in result.stderr
    assert Store(held).releases() == ["DR1"]


def test_in_process_no_wait_policy(held):
    LockPolicy.wait = False
    try:
        with pytest.raises(EnvironmentFault, match="being written by test holder"):
            with Store(held).writing("second"):
                pass
    finally:
        LockPolicy.wait = True


def _add_marks(root, worker, n):
    store = Store(root)
    for i in range(n):
        row = {
            "source_id": worker * 1000 + i,
            "release": None,
            "mark": "boring",
            "note": None,
            "user": f"w{worker}",
            "time": datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc),
        }
        store.add_marks(pa.Table.from_pylist([row], schema=MARKS_SCHEMA))


def test_concurrent_manifest_updates_are_all_kept(tmp_path):
    root = tmp_path / "store"
    Store(root)
    context = multiprocessing.get_context("spawn")  # fork after torch threads can crash
    workers = [context.Process(target=_add_marks, args=(root, w, 100)) for w in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    store = Store(root)
    marks = store.read_marks()
    assert marks.num_rows == 600
    assert len(set(marks.column("source_id").to_pylist())) == 600
    assert store.read_manifest()["marks"]["marks.parquet"]["rows"] == 600


def test_two_ingests_of_releases_with_a_common_prefix_both_land(tmp_path):
    """The scratch folder of DR2 is not that of DR2-b (exact names, never prefixes)."""
    root = tmp_path / "store"
    a = source_release(tmp_path / "a", 0, 600)
    b = source_release(tmp_path / "b", 600, 600)
    procs = [
        subprocess.Popen(
            [*CLI, "ingest", str(src), "--store", str(root), "--release", name],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for src, name in ((a, "DR2"), (b, "DR2-b"))
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    store = Store(root)
    assert sorted(store.releases()) == ["DR2", "DR2-b"]
    assert store.read_shards(release="DR2").num_rows == 600
    assert store.read_shards(release="DR2-b").num_rows == 600
    assert not list((root / ".scratch").glob("*")) if (root / ".scratch").exists() else True


def test_scratch_of_one_release_is_not_touched_by_another(tmp_path):
    store = Store(tmp_path / "store")
    with store.writing("test"):
        with store.scratch("ingest", "DR2-b") as other:
            (other / "run-0.parquet").write_bytes(b"x")
            with store.scratch("ingest", "DR2") as mine:
                assert mine != other
                assert (other / "run-0.parquet").exists()
