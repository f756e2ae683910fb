"""kill -9 at a random moment of every writing stage, then the same command again: the store
answers as before or as after (or with a one-line error) while it is broken off, and after the
rerun it holds byte for byte what a run that was never killed wrote. The long mode
(benchmarks/bench_faults.py) repeats this at many moments."""

from __future__ import annotations

import random

import pytest

from tests.reliability.harness import KILL_STAGES, clean_chain, kill_trial


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return clean_chain(tmp_path_factory.mktemp("chain"))


def test_the_clean_chain_is_deterministic(chain, tmp_path):
    """The comparison below is fair only if two clean runs from one start write the same bytes.
    (The start is shared: calibrating afresh is not bit for bit repeatable, as k-means sums in
    threads; scores move by about 1e-7.)"""
    again = clean_chain(tmp_path, start=chain.states[0])
    assert again.contents == chain.contents
    assert again.answers == chain.answers


@pytest.mark.parametrize("stage", KILL_STAGES)
def test_kill_9_then_rerun_equals_a_clean_run(chain, stage, tmp_path):
    trial = kill_trial(chain, stage, tmp_path, random.Random(f"{stage}-7"))
    assert trial.lost == 0, trial
    assert trial.wrong == [], trial
    assert trial.tracebacks == [], trial
    assert trial.problems == [], trial
