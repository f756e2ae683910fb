"""The recipe in resumable slices: a sitting ends when its minutes are spent, the same command
continues (finished stages are not run again), and the card keeps every sitting's command and
each stage's time summed over the sittings."""

from __future__ import annotations

import json

import pytest

from specsearch.models.factory import build_model, read_card, save_model
from specsearch.train import recipe
from specsearch.train.loop import TrainConfig

from .conftest import TINY


def fake_stages(calls: list[str], work, budgets: list[float]):
    """Three stages; the second needs two sittings (unfinished the first time it runs)."""
    runs = {"count": 0}

    def make(name: str, needs: int = 1):
        def run(cfg: TrainConfig) -> dict:
            calls.append(name)
            budgets.append(cfg.max_minutes)
            runs[name] = runs.get(name, 0) + 1
            if name == "last":
                save_model(build_model("specclip", TINY, variant="pr"), work / "labels", {})
            return {"finished": runs[name] >= needs}

        return run

    def stages(*args, **kwargs):
        return [
            recipe.Stage("first", TrainConfig(epochs=1), make("first")),
            recipe.Stage("second", TrainConfig(epochs=1), make("second", needs=2)),
            recipe.Stage("last", TrainConfig(epochs=1), make("last"), resumable=False),
        ]

    return stages


def test_sittings_resume_and_the_card_keeps_every_command(tmp_path, monkeypatch):
    work, out = tmp_path / "work", tmp_path / "model"
    calls: list[str] = []
    budgets: list[float] = []
    monkeypatch.setattr(recipe, "stages", fake_stages(calls, work, budgets))
    monkeypatch.setattr(recipe, "make_data", lambda *a, **k: {})

    first = recipe.run(out, work, max_minutes=30, command="sitting 1")
    assert first is None and calls == ["first", "second"]  # the second stage is unfinished
    assert 0 < budgets[0] <= 30 and 0 < budgets[1] <= 30  # each resumable stage gets what is left
    assert json.loads((work / "first.json").read_text())["finished"] is True
    assert json.loads((work / "second.json").read_text())["finished"] is False

    second = recipe.run(out, work, max_minutes=30, command="sitting 2")
    assert second == out
    assert calls == ["first", "second", "second", "last"]  # "first" was not run again
    assert budgets[-1] == 0.0  # a short stage that cannot resume runs whole
    card = read_card(out)
    assert card["commands"] == ["sitting 1", "sitting 2"]
    assert set(card["stage_minutes"]) == {"data", "first", "second", "last"}
    assert card["model_id"] == "model"

    calls.clear()
    assert recipe.run(out, work, command="sitting 3") == out and calls == []  # all done


def test_a_killed_sitting_keeps_the_time_of_its_logged_epochs(tmp_path, monkeypatch):
    work = tmp_path / "work"

    def stages(work_, data, seed, scale, device, log, init=None):
        def killed(cfg: TrainConfig) -> dict:
            log("epoch=1 ...")  # the trainer logs every epoch
            raise KeyboardInterrupt  # as if the sitting were killed in the second epoch

        return [recipe.Stage("slow", TrainConfig(epochs=2), killed)]

    monkeypatch.setattr(recipe, "stages", stages)
    monkeypatch.setattr(recipe, "make_data", lambda *a, **k: {})
    with pytest.raises(KeyboardInterrupt):
        recipe.run(tmp_path / "model", work, command="sitting 1")
    record = json.loads((work / "slow.json").read_text())
    assert record["finished"] is False and record["seconds"] > 0


def test_the_second_alignment_starts_from_the_first_and_feeds_the_heads(tmp_path, monkeypatch):
    """align_more continues the first alignment (its best checkpoint) on both simulated surveys
    at half the rate, and the label heads are fine-tuned on what it made."""
    seen: dict = {}
    monkeypatch.setattr(
        recipe,
        "align",
        lambda data, lrs, xp, out, *a, **k: seen.setdefault(out.name, (data, a[-1])) and {},
    )
    monkeypatch.setattr(
        recipe, "finetune", lambda model, data, out, *a, **k: seen.setdefault(out.name, model)
    )
    data = {name: tmp_path / name for name in ("sim", "sim2", "realpair", "real")}
    stages = recipe.stages(tmp_path, data, seed=0, scale=1.0, device="cpu", log=print)
    names = [s.name for s in stages]
    assert names == [
        "pretrain_lrs",
        "pretrain_xp",
        "align",
        "align_more",
        "finetune_xp",
        "finetune_lrs",
    ]
    by_name = {s.name: s for s in stages}
    assert by_name["align_more"].cfg.lr == by_name["align"].cfg.lr / 2
    for name in ("align", "align_more", "finetune_xp"):
        by_name[name].run(by_name[name].cfg)
    first_data, first_init = seen["clip"]
    more_data, more_init = seen["clip2"]
    assert data["sim2"] not in first_data and first_init is None
    assert more_data == [data["sim"], data["sim2"], data["realpair"]]
    assert more_init == tmp_path / "clip" / "best"
    assert seen["labels_xp"] == tmp_path / "clip2" / "best"
