"""Training data: canonical shards -> model-input tensors, with the split rule applied."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import torch

from ..errors import SpecsearchError
from ..grids import N_LRS, N_XP
from ..models.inputs import lrs_inputs, xp_inputs
from ..schema import LABELS, column_matrix
from ..splits import select_split
from ..store import MANIFEST, Store


def shard_files(paths: list[Path]) -> list[str]:
    """Parquet shard files under each path (a file, a folder of shards, or a store: the shard
    files of every release its manifest lists)."""
    files: list[str] = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(str(path))
            continue
        if not path.exists():
            raise SpecsearchError(f"{path}: no such file or directory")
        if (path / MANIFEST).exists():
            files += [str(p) for p in Store.open(path).shard_files()]
            continue
        found = sorted(p for p in path.rglob("part-*.parquet"))
        if not found:
            raise SpecsearchError(f"{path}: holds no canonical shards (part-*.parquet)")
        files += [str(p) for p in found]
    return files


def load_table(paths: list[Path], split: str, columns: list[str]) -> pa.Table:
    """Rows of ``split`` (exact source_id rule) from the shards under ``paths``."""
    table = ds.dataset(shard_files(paths), format="parquet").to_table(
        columns=["source_id", *columns]
    )
    keep = select_split(table.column("source_id").to_numpy(), split)
    return table.filter(pa.array(keep))


@dataclass
class SpectraArrays:
    """Model inputs for n stars; a missing modality is flagged in ``has_lrs`` / ``has_xp``."""

    source_id: np.ndarray
    lrs_z: np.ndarray  # (n, 1462) z-scored continuum-normalised flux
    lrs_stats: np.ndarray  # (n, 2) [mean, log10 std]
    lrs_ivar: np.ndarray  # (n, 1462) inverse variance of the continuum-normalised flux
    xp_x: np.ndarray  # (n, 343) flux / norm
    xp_stats: np.ndarray  # (n, 1) log10 norm
    labels: np.ndarray  # (n, 4) teff, logg, fe_h, alpha_m; NaN unknown
    has_lrs: np.ndarray
    has_xp: np.ndarray

    def __len__(self) -> int:
        return len(self.source_id)

    def subset(self, mask: np.ndarray) -> SpectraArrays:
        return SpectraArrays(**{k: v[mask] for k, v in self.__dict__.items()})

    def tensors(self, names: tuple[str, ...]) -> list[torch.Tensor]:
        return [torch.from_numpy(np.ascontiguousarray(getattr(self, n))) for n in names]


def arrays_from_table(table: pa.Table) -> SpectraArrays:
    """Canonical rows -> model inputs, prepared exactly as `specsearch.models.runner` prepares them."""
    n = table.num_rows
    names = table.column_names
    lrs_flux = (
        column_matrix(table, "lrs_flux")
        if "lrs_flux" in names
        else np.full((n, N_LRS), np.nan, np.float32)
    )
    lrs_ivar = (
        column_matrix(table, "lrs_ivar")
        if "lrs_ivar" in names
        else np.zeros((n, N_LRS), np.float32)
    )
    xp_flux = (
        column_matrix(table, "xp_flux")
        if "xp_flux" in names
        else np.full((n, N_XP), np.nan, np.float32)
    )
    lrs, xp = lrs_inputs(lrs_flux, lrs_ivar), xp_inputs(xp_flux)
    labels = np.stack(
        [
            table.column(label).to_numpy(zero_copy_only=False).astype(np.float32)
            if label in names
            else np.full(n, np.nan, np.float32)
            for label in LABELS
        ],
        axis=1,
    )
    return SpectraArrays(
        source_id=table.column("source_id").to_numpy(),
        lrs_z=lrs["z"],
        lrs_stats=lrs["stats"],
        lrs_ivar=lrs["ivar"],
        xp_x=xp["x"],
        xp_stats=xp["stats"],
        labels=labels,
        has_lrs=lrs["present"],
        has_xp=xp["present"],
    )


def load_arrays(
    paths: list[Path], split: str = "train", require: tuple[str, ...] = ()
) -> SpectraArrays:
    """Model inputs of ``split`` from the shards under ``paths``; keep rows with every ``require``d modality."""
    columns = ["lrs_flux", "lrs_ivar", "xp_flux", *LABELS]
    arrays = arrays_from_table(load_table(paths, split, columns))
    keep = np.ones(len(arrays), dtype=bool)
    if "lrs" in require:
        keep &= arrays.has_lrs
    if "xp" in require:
        keep &= arrays.has_xp
    if not keep.any():
        raise SpecsearchError(
            f"no {split} rows with {' and '.join(require) or 'data'} under {', '.join(map(str, paths))}"
        )
    return arrays.subset(keep)
