"""Batched inference with a trained SpecCLIP model: the API every later stage calls.

    runner = SpecCLIPRunner("default", device="auto")
    out = runner.run_batch(lrs_flux=..., lrs_ivar=..., xp_flux=..., xp_flux_error=...)

Inputs are the canonical shard arrays (`specsearch.schema`): ``lrs_flux`` (n, 1462)
continuum-normalised with ``lrs_ivar`` (0 = bad pixel), ``xp_flux`` / ``xp_flux_error`` (n, 343)
in W m^-2 nm^-1. A star whose row is all NaN (or whose LRS has no good pixel, or whose XP has no
positive flux over 500-600 nm) lacks that modality: its outputs for it are NaN rows.
Preprocessing is `specsearch.models.inputs` (the same code prepares training data).

Outputs, all float32 numpy, in canonical units (see `run_batch`):
- embeddings: L2-normalised vectors in the shared CLIP space (the shared part for ``split``);
  cosine similarity = dot product, comparable across modalities;
- in-modal reconstructions and cross-modal predictions (``pr`` and ``split`` models): LRS as
  continuum-normalised flux, XP in W m^-2 nm^-1 (the XP decoders predict flux / norm; the norm is
  the star's own observed XP norm, since an LRS alone does not tell the absolute flux);
- stellar labels with 1-sigma uncertainties (models with fitted label heads).
Every output is always returned; arrays a model cannot make (no decoders, unfitted label heads)
are NaN.

The XP flux error is accepted for symmetry but not used by the current models.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SpecsearchError
from ..grids import N_LRS, N_XP
from .clip import SpecCLIPModel
from .device import choose_device
from .factory import load_model
from .inputs import lrs_inputs, xp_inputs
from .registry import resolve_model

# each modality's outputs, its embedding first
LRS_OUTPUTS = ("lrs_embedding", "lrs_recon", "xp_from_lrs", "xp_from_lrs_normalised")
XP_OUTPUTS = ("xp_embedding", "xp_recon", "lrs_from_xp")
SPECTRA = ("lrs_recon", "xp_from_lrs", "xp_from_lrs_normalised", "xp_recon", "lrs_from_xp")
OUTPUTS = (
    "has_lrs",
    "has_xp",
    *LRS_OUTPUTS,
    *XP_OUTPUTS,
    "lrs_features",
    "xp_features",
    "align_cos",
    "lrs_labels",
    "xp_labels",
    "labels",
)


def _out_of_memory(err: BaseException) -> bool:
    """A failed allocation: torch.OutOfMemoryError (CUDA), or the CPU allocator's RuntimeError."""
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or (
        "can't allocate memory" in str(err)
    )


class SpecCLIPRunner:
    """A loaded SpecCLIP model that maps batches of spectra to embeddings, spectra and labels.

    model: a model id ("default", shipped or user-installed), a model directory, or a
    SpecCLIPModel in memory. device: "auto", "cpu" or "cuda" (bf16 autocast on CUDA).
    batch_size: stars per forward pass (default 64 on CPU, where a batch's activations stay in
    cache: 1.15x the speed of 256, measured side by side; 2048 on CUDA); halved, for the rest of
    the run, whenever a batch runs out of memory.
    """

    def __init__(
        self,
        model: str | Path | SpecCLIPModel = "default",
        device: str = "auto",
        batch_size: int | None = None,
    ):
        self.device = choose_device(device)
        if isinstance(model, SpecCLIPModel):
            self.model, self.model_id = model, "in-memory"
        else:
            directory = resolve_model(model)
            loaded = load_model(directory)
            if not isinstance(loaded, SpecCLIPModel):
                raise SpecsearchError(
                    f"{directory}: a {loaded.kind} model, not an aligned SpecCLIP model"
                )
            self.model, self.model_id = loaded, directory.name
        self.model.to(self.device).eval()
        self.autocast = self.device.type == "cuda"
        self.batch_size = int(batch_size or (2048 if self.autocast else 64))
        if self.batch_size < 1:
            raise SpecsearchError("batch_size must be at least 1")

    # --- what the model offers ----------------------------------------------------------------

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    @property
    def feature_dim(self) -> int:
        """Width of the heads' output (``*_features``): embed_dim, or shared + private (split)."""
        return self.model.config.clip.embed_dim

    @property
    def variant(self) -> str:
        return self.model.variant

    @property
    def has_decoders(self) -> bool:
        return self.model.has_decoders

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.model.config.labels.labels)

    @property
    def labels_fitted(self) -> bool:
        return self.model.labels_fitted

    def output_names(self) -> list[str]:
        """The keys `run_batch` returns (all of them, always; NaN where not available)."""
        return list(OUTPUTS)

    # --- the one batched forward --------------------------------------------------------------

    def run_batch(
        self,
        lrs_flux: np.ndarray | None = None,
        lrs_ivar: np.ndarray | None = None,
        xp_flux: np.ndarray | None = None,
        xp_flux_error: np.ndarray | None = None,
        outputs: Iterable[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Everything the model can say about n stars, one forward pass per batch of stars.

        Every key is returned (``outputs`` restricts them); a row is NaN where the star lacks the
        needed modality, and a whole array is NaN where the model cannot make it (no decoders in
        a ``base`` model, label heads not fitted):
        - has_lrs, has_xp (n,) bool: which stars have each modality;
        - lrs_embedding, xp_embedding (n, d) float32, L2-normalised;
        - lrs_features, xp_features (n, f) float32: the heads' whole output, from which the
          decoders and label heads work (``decode_features`` turns them back into spectra);
        - align_cos (n,): cosine between a star's two embeddings;
        - lrs_recon (n, 1462): continuum-normalised flux, the in-modal reconstruction
          un-z-scored with the star's own mean and std;
        - lrs_from_xp (n, 1462): continuum-normalised flux predicted from the XP spectrum;
        - xp_recon (n, 343): W m^-2 nm^-1;
        - xp_from_lrs (n, 343): W m^-2 nm^-1, the prediction from the LRS scaled by the star's
          observed XP norm (NaN where the star has no XP);
        - xp_from_lrs_normalised (n, 343): the same prediction as flux / norm (unit mean flux
          over 500-600 nm), for every star with an LRS;
        - lrs_labels, xp_labels: {label: (n,), label_err: (n,)} for teff, logg, fe_h, alpha_m,
          mean and 1-sigma from each modality's head; labels: their inverse-variance combination.
        """
        lrs = None if lrs_flux is None else lrs_inputs(lrs_flux, lrs_ivar)
        xp = None if xp_flux is None else xp_inputs(xp_flux)
        if lrs is None and xp is None:
            raise SpecsearchError("run_batch needs lrs_flux or xp_flux")
        n = len((lrs or xp)["present"])
        if lrs is not None and xp is not None and len(xp["present"]) != n:
            raise SpecsearchError(f"lrs_flux has {n} rows but xp_flux has {len(xp['present'])}")
        wanted = set(OUTPUTS) if outputs is None else set(outputs)
        unknown = wanted - set(OUTPUTS)
        if unknown:
            raise SpecsearchError(
                f"unknown output(s) {', '.join(sorted(unknown))}; see SpecCLIPRunner.output_names()"
            )
        out = self._allocate(n, wanted)
        out["has_lrs"] = np.zeros(n, bool) if lrs is None else lrs["present"]
        out["has_xp"] = np.zeros(n, bool) if xp is None else xp["present"]
        start = 0
        while start < n:
            rows = np.arange(start, min(start + self.batch_size, n))
            try:
                self._forward_rows(rows, lrs, xp, out)
            except (RuntimeError, MemoryError) as err:
                if not _out_of_memory(err):
                    raise
                if self.batch_size == 1:
                    raise SpecsearchError(f"out of memory with one star per batch: {err}") from None
                # the batch adapts to memory: halve it and redo these rows, for the rest of the run
                self.batch_size = max(1, self.batch_size // 2)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            start += len(rows)
        self._combine(out)
        return {k: v for k, v in out.items() if k in wanted or k in ("has_lrs", "has_xp")}

    # --- convenience views on run_batch -------------------------------------------------------

    def encode_lrs(self, lrs_flux: np.ndarray, lrs_ivar: np.ndarray | None = None) -> np.ndarray:
        """(n, 1462) continuum-normalised flux (+ ivar) -> (n, d) L2-normalised float32."""
        return self.run_batch(lrs_flux=lrs_flux, lrs_ivar=lrs_ivar, outputs=["lrs_embedding"])[
            "lrs_embedding"
        ]

    def encode_xp(self, xp_flux: np.ndarray, xp_flux_error: np.ndarray | None = None) -> np.ndarray:
        """(n, 343) W m^-2 nm^-1 -> (n, d) L2-normalised float32."""
        return self.run_batch(
            xp_flux=xp_flux, xp_flux_error=xp_flux_error, outputs=["xp_embedding"]
        )["xp_embedding"]

    def reconstruct_lrs(
        self, lrs_flux: np.ndarray, lrs_ivar: np.ndarray | None = None
    ) -> np.ndarray:
        """In-modal reconstruction, (n, 1462) continuum-normalised flux."""
        self._need_decoders()
        return self.run_batch(lrs_flux=lrs_flux, lrs_ivar=lrs_ivar, outputs=["lrs_recon"])[
            "lrs_recon"
        ]

    def reconstruct_xp(
        self, xp_flux: np.ndarray, xp_flux_error: np.ndarray | None = None
    ) -> np.ndarray:
        """In-modal reconstruction, (n, 343) W m^-2 nm^-1."""
        self._need_decoders()
        return self.run_batch(xp_flux=xp_flux, xp_flux_error=xp_flux_error, outputs=["xp_recon"])[
            "xp_recon"
        ]

    def translate(
        self,
        to: str,
        lrs_flux: np.ndarray | None = None,
        lrs_ivar: np.ndarray | None = None,
        xp_flux: np.ndarray | None = None,
        xp_flux_error: np.ndarray | None = None,
        normalised: bool = False,
    ) -> np.ndarray:
        """Cross-spectrum prediction.

        to="lrs": from xp_flux, (n, 1462) continuum-normalised LRS flux.
        to="xp": from lrs_flux, (n, 343) in W m^-2 nm^-1 scaled by the star's observed XP norm
        (so xp_flux is needed; rows without an XP are NaN), or with ``normalised=True`` the
        predicted shape as flux / norm (unit mean flux over 500-600 nm) for every star.
        """
        self._need_decoders()
        if to == "lrs":
            if xp_flux is None:
                raise SpecsearchError("translate to lrs needs xp_flux")
            result = self.run_batch(
                xp_flux=xp_flux, xp_flux_error=xp_flux_error, outputs=["lrs_from_xp"]
            )
            return result["lrs_from_xp"]
        if to == "xp":
            if lrs_flux is None:
                raise SpecsearchError("translate to xp needs lrs_flux")
            key = "xp_from_lrs_normalised" if normalised else "xp_from_lrs"
            if key == "xp_from_lrs" and xp_flux is None:
                raise SpecsearchError(
                    "translate to xp in W m^-2 nm^-1 needs the star's xp_flux for its norm; "
                    "pass normalised=True for the shape alone"
                )
            return self.run_batch(
                lrs_flux=lrs_flux, lrs_ivar=lrs_ivar, xp_flux=xp_flux, outputs=[key]
            )[key]
        raise SpecsearchError(f"translate: 'to' must be lrs or xp, not {to!r}")

    def predict_labels(
        self,
        lrs_flux: np.ndarray | None = None,
        lrs_ivar: np.ndarray | None = None,
        xp_flux: np.ndarray | None = None,
        xp_flux_error: np.ndarray | None = None,
    ) -> dict[str, dict[str, np.ndarray]]:
        """{"labels", "lrs_labels", "xp_labels"}, each {label: mean, label_err: sigma}, (n,) arrays
        in physical units (K, dex); "labels" combines the modalities by inverse variance."""
        if not self.labels_fitted:
            raise SpecsearchError(
                f"model {self.model_id} has no fitted label heads (run 'specsearch train finetune')"
            )
        names = ["labels", "lrs_labels", "xp_labels"]
        result = self.run_batch(lrs_flux, lrs_ivar, xp_flux, xp_flux_error, outputs=names)
        return {k: result[k] for k in names}

    # --- internals ----------------------------------------------------------------------------

    def _need_decoders(self) -> None:
        if not self.has_decoders:
            raise SpecsearchError(
                f"model {self.model_id} ({self.variant}) has no decoders; use a pr or split model"
            )

    def _allocate(self, n: int, wanted: set[str]) -> dict:
        """NaN-filled outputs for the wanted keys."""
        widths = {
            "lrs_embedding": self.embed_dim,
            "xp_embedding": self.embed_dim,
            "lrs_features": self.feature_dim,
            "xp_features": self.feature_dim,
            "align_cos": None,
        }
        widths |= {"lrs_recon": N_LRS, "lrs_from_xp": N_LRS, "xp_recon": N_XP}
        widths |= {"xp_from_lrs": N_XP, "xp_from_lrs_normalised": N_XP}
        if "align_cos" in wanted:
            wanted = wanted | {"lrs_embedding", "xp_embedding"}
        if "labels" in wanted:
            wanted = wanted | {"lrs_labels", "xp_labels"}
        out: dict = {}
        for key in wanted:
            if key in widths:
                out[key] = np.full(
                    (n,) if widths[key] is None else (n, widths[key]), np.nan, dtype=np.float32
                )
            elif key in ("labels", "lrs_labels", "xp_labels"):
                out[key] = {
                    f"{label}{s}": np.full(n, np.nan, dtype=np.float32)
                    for label in self.labels
                    for s in ("", "_err")
                }
        return out

    @torch.inference_mode()
    def _forward_rows(self, rows: np.ndarray, lrs, xp, out: dict) -> None:
        """Fill ``out`` for one batch of star rows: encoder, head, decoders, label head."""
        model, device = self.model, self.device
        for modality, inputs, own in (("lrs", lrs, LRS_OUTPUTS), ("xp", xp, XP_OUTPUTS)):
            labels_key = f"{modality}_labels"
            want_labels = labels_key in out and bool(model.label_heads[modality].fitted)
            want_spectra = self.has_decoders and bool(set(own[1:]) & set(out))
            want_features = f"{modality}_features" in out
            if inputs is None or not (
                own[0] in out or want_spectra or want_labels or want_features
            ):
                continue
            idx = rows[inputs["present"][rows]]
            if not idx.size:
                continue
            stats = torch.from_numpy(inputs["stats"][idx]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast):
                if modality == "lrs":
                    z = torch.from_numpy(inputs["z"][idx]).to(device)
                    ivar = torch.from_numpy(inputs["ivar"][idx]).to(device)
                    features = model.lrs_features(z, stats, ivar)
                    decoded = model.decode(lrs_features=features) if want_spectra else {}
                else:
                    features = model.xp_features(
                        torch.from_numpy(inputs["x"][idx]).to(device), stats
                    )
                    decoded = model.decode(xp_features=features) if want_spectra else {}
                labels = model.label_heads[modality].predict(features) if want_labels else None
            features = features.float()
            if own[0] in out:
                out[own[0]][idx] = F.normalize(model.clip_part(features), dim=-1).cpu().numpy()
            if f"{modality}_features" in out:
                out[f"{modality}_features"][idx] = features.cpu().numpy()
            if labels is not None:
                mean, sigma = (a.float().cpu().numpy() for a in labels)
                for j, label in enumerate(self.labels):
                    out[labels_key][label][idx] = mean[:, j]
                    out[labels_key][f"{label}_err"][idx] = sigma[:, j]
            spectra = {k: v.float() for k, v in decoded.items()}
            self._store_spectra(spectra, stats, idx, xp, out)

    def _store_spectra(self, spectra: dict, stats: torch.Tensor, idx, xp, out: dict) -> None:
        """Decoder outputs of rows ``idx`` -> canonical units, into ``out`` (see run_batch).
        ``stats`` are the rows' own model-input stats of the decoded modality."""
        if "lrs_recon" in spectra and "lrs_recon" in out:
            # z -> continuum-normalised flux with the star's own mean and std
            flux = stats[:, :1] + 10.0 ** stats[:, 1:2] * spectra["lrs_recon"]
            out["lrs_recon"][idx] = flux.cpu().numpy()
        if "xp_from_lrs" in spectra:
            shape = spectra["xp_from_lrs"].cpu().numpy()
            if "xp_from_lrs_normalised" in out:
                out["xp_from_lrs_normalised"][idx] = shape
            if "xp_from_lrs" in out and xp is not None:
                out["xp_from_lrs"][idx] = shape * xp["norm"][idx, None]
        if "xp_recon" in spectra and "xp_recon" in out:
            out["xp_recon"][idx] = (spectra["xp_recon"] * 10.0 ** stats[:, :1]).cpu().numpy()
        if "lrs_from_xp" in spectra and "lrs_from_xp" in out:
            out["lrs_from_xp"][idx] = spectra["lrs_from_xp"].cpu().numpy()

    @torch.inference_mode()
    def decode_features(
        self,
        lrs_features: np.ndarray | None = None,
        xp_features: np.ndarray | None = None,
        lrs_flux: np.ndarray | None = None,
        lrs_ivar: np.ndarray | None = None,
        xp_flux: np.ndarray | None = None,
        outputs: Iterable[str] = SPECTRA,
    ) -> dict[str, np.ndarray]:
        """The decoders' spectra, in run_batch's units, from stored ``*_features`` (n, f).

        The observed spectra give what the units need: ``lrs_flux`` (+ ivar) the LRS stats that
        undo the z-scoring of ``lrs_recon``, ``xp_flux`` the norm of ``xp_recon`` and
        ``xp_from_lrs``. Rows whose features are NaN (the modality is missing) give NaN rows.
        Run on the features ``run_batch`` returned, the spectra equal run_batch's own.
        """
        self._need_decoders()
        wanted = set(outputs) & set(SPECTRA)
        lrs = None if lrs_flux is None else lrs_inputs(lrs_flux, lrs_ivar)
        xp = None if xp_flux is None else xp_inputs(xp_flux)
        n = len(lrs_features if lrs_features is not None else xp_features)
        out = self._allocate(n, wanted)
        for modality, features, inputs in (("lrs", lrs_features, lrs), ("xp", xp_features, xp)):
            if features is None:
                continue
            features = np.asarray(features, dtype=np.float32)
            present = np.isfinite(features).all(axis=1)
            for start in range(0, n, self.batch_size):
                idx = np.flatnonzero(present[start : start + self.batch_size]) + start
                if not idx.size:
                    continue
                tensor = torch.from_numpy(features[idx]).to(self.device)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    decoded = self.model.decode(**{f"{modality}_features": tensor})
                spectra = {k: v.float() for k, v in decoded.items()}
                stats = None
                if inputs is not None:
                    stats = torch.from_numpy(inputs["stats"][idx]).to(self.device)
                elif modality == "lrs":
                    spectra.pop("lrs_recon")  # its units need the observed LRS
                else:
                    spectra.pop("xp_recon")  # its units need the observed XP
                self._store_spectra(spectra, stats, idx, xp, out)
        return out

    def _combine(self, out: dict) -> None:
        """The outputs that use both modalities: align_cos and the combined labels."""
        if "align_cos" in out:
            out["align_cos"] = np.sum(out["lrs_embedding"] * out["xp_embedding"], axis=1).astype(
                np.float32
            )
        if "labels" not in out:
            return
        for label in self.labels:
            parts = [(out[k][label], out[k][f"{label}_err"]) for k in ("lrs_labels", "xp_labels")]
            with np.errstate(invalid="ignore", divide="ignore"):
                weights = [
                    np.where(np.isfinite(err), 1.0 / np.square(err), 0.0) for _, err in parts
                ]
                total = np.sum(weights, axis=0)
                weighted = np.sum(
                    [w * np.nan_to_num(m) for w, (m, _) in zip(weights, parts, strict=True)], axis=0
                )
                combined = np.where(total > 0, weighted / total, np.nan)
                # a star seen by one modality gets that modality's value exactly
                for (mean, _), w in zip(parts, weights, strict=True):
                    combined = np.where((w > 0) & (w == total), mean, combined)
                out["labels"][label] = combined.astype(np.float32)
                out["labels"][f"{label}_err"] = np.where(
                    total > 0, 1.0 / np.sqrt(total), np.nan
                ).astype(np.float32)
