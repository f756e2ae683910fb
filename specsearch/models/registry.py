"""Where models live, and their cards.

- Shipped models: ``specsearch/models/weights/<model_id>/`` inside the package.
- User-installed models: ``$SPECSEARCH_MODELS/<model_id>/``, default ``~/.specsearch/models``.

A model directory holds ``model.safetensors``, ``config.json`` and ``card.json`` (see `factory`).
When an id exists in both places the shipped one wins, so ``default`` always means the same
model for a given specsearch version. ``default`` is `DEFAULT_MODEL_ID`, the shipped small model.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SpecsearchError
from .configs import config_to_dict
from .factory import CONFIG_FILE, read_card, read_model_config

SHIPPED_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_MODEL_ID = "specclip-small-v2"  # what train/recipe.py builds (v1 stays loadable by id)


def user_models_dir() -> Path:
    return Path(
        os.environ.get("SPECSEARCH_MODELS") or Path.home() / ".specsearch" / "models"
    ).expanduser()


def _model_dirs() -> list[tuple[str, Path]]:
    """(source, directory) for every model directory, shipped first, sorted by id."""
    found = []
    for source, root in (("shipped", SHIPPED_DIR), ("user", user_models_dir())):
        if root.is_dir():
            found += [(source, d) for d in sorted(root.iterdir()) if (d / CONFIG_FILE).is_file()]
    return found


def _summary(source: str, directory: Path) -> dict:
    card = read_card(directory)
    try:
        kind, config = read_model_config(directory)
        clip = getattr(config, "clip", None)
        variant = clip.variant if clip is not None else None
        embed_dim = clip.clip_dim if clip is not None else None
        config_name = getattr(config, "name", None)
    except SpecsearchError:
        kind, variant, embed_dim, config_name = "unreadable", None, None, None
    return {
        "id": directory.name,
        "source": source,
        "path": str(directory),
        "kind": kind,
        "config": config_name,
        "variant": variant,
        "embed_dim": embed_dim,
        "description": card.get("description", ""),
    }


def list_models() -> list[dict]:
    """One dict per installed model: id, source, path, kind, config, variant, embed_dim, description."""
    seen: set[str] = set()
    out = []
    for source, directory in _model_dirs():
        if directory.name in seen:  # a user model cannot shadow a shipped one
            continue
        seen.add(directory.name)
        out.append(_summary(source, directory))
    return out


def resolve_model(id_or_path: str | Path) -> Path:
    """A model id ("default", a shipped or user id) or a model directory -> the directory."""
    text = str(id_or_path)
    path = Path(text).expanduser()
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        return path
    model_id = DEFAULT_MODEL_ID if text == "default" else text
    for _, directory in _model_dirs():
        if directory.name == model_id:
            return directory
    if path.is_dir():
        raise SpecsearchError(f"{path}: not a model directory (no {CONFIG_FILE})")
    if text == "default":
        raise SpecsearchError(
            f"the default model {DEFAULT_MODEL_ID!r} is not installed; train one "
            "(specsearch train ...) and pass its directory with --model"
        )
    raise SpecsearchError(
        f"unknown model {text!r}; 'specsearch models list' shows the installed ones"
    )


def model_card(id_or_path: str | Path) -> dict:
    """The card of a model, with its id, location and config added."""
    directory = resolve_model(id_or_path)
    kind, config = read_model_config(directory)
    card = read_card(directory)
    source = "shipped" if directory.parent == SHIPPED_DIR else "user"
    return {
        **card,
        "id": directory.name,
        "source": source,
        "path": str(directory),
        "kind": kind,
        "config": config_to_dict(config),
    }
