"""Where FAISS work runs: the CPU, or a GPU when faiss was built with CUDA and one is present.

The build code talks to a ``Device`` only: move an index there, bring it back to host form for
saving, train on it, run exact k-NN on it, set search parameters on it. ``CpuDevice`` does
everything in place; ``GpuDevice`` uses ``faiss.index_cpu_to_gpu`` / ``index_gpu_to_cpu`` and
falls back to the CPU for index types the GPU kernels lack (HNSW, IDMap2 over anything but Flat).
Tests exercise the GPU branch by passing a ``Device`` subclass whose moves are copies.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

from specsearch.errors import SpecsearchError

from .measure import set_search_params

log = logging.getLogger(__name__)

GPU_MAX_NPROBE = 2048
"""FAISS GPU IVF kernels accept at most this many probes (and k <= 2048)."""


class CpuDevice:
    """Everything on the CPU: moves are no-ops."""

    name = "cpu"
    is_gpu = False

    def to_device(self, index: faiss.Index) -> faiss.Index:
        """The index to train, add to and search on this device (may be ``index`` itself)."""
        return index

    def to_host(self, index: faiss.Index) -> faiss.Index:
        """A CPU copy of an index returned by ``to_device``, fit for ``faiss.write_index``."""
        return index

    def discard(self, index: faiss.Index) -> None:
        """Forget an index returned by ``to_device`` that will not be brought back."""

    def knn(self, queries: np.ndarray, embeddings: np.ndarray, k: int):
        """Exact inner-product top-k: (similarities (nq, k), row positions (nq, k))."""
        return faiss.knn(
            queries,
            np.ascontiguousarray(embeddings, dtype=np.float32),
            k,
            metric=faiss.METRIC_INNER_PRODUCT,
        )

    def clustering_index(self, d: int) -> faiss.Index | None:
        """An index for k-means assignment during IVF training (None: FAISS's own default)."""
        return None

    def set_params(self, index: faiss.Index, search_params: str) -> None:
        set_search_params(index, search_params)


class GpuDevice(CpuDevice):
    """One or more CUDA GPUs through faiss-gpu (``pip install specsearch[gpu]``)."""

    name = "cuda"
    is_gpu = True

    def __init__(self) -> None:
        self._resources = None
        self._moved: dict[int, faiss.Index] = {}  # GPU indexes made here, held so ids stay unique

    @property
    def resources(self):
        if self._resources is None:
            self._resources = faiss.StandardGpuResources()
        return self._resources

    def _cpu_to_gpu(self, index: faiss.Index) -> faiss.Index:
        options = faiss.GpuClonerOptions()
        options.useFloat16 = False  # keep exact float32 for Flat; SQ/PQ codes are unaffected
        return faiss.index_cpu_to_gpu(self.resources, 0, index, options)

    def _gpu_to_cpu(self, index: faiss.Index) -> faiss.Index:
        return faiss.index_gpu_to_cpu(index)

    def to_device(self, index: faiss.Index) -> faiss.Index:
        try:
            moved = self._cpu_to_gpu(index)
        except (RuntimeError, AttributeError) as err:  # a type without GPU kernels stays here
            log.info("index stays on the CPU: %s", str(err).splitlines()[0] if str(err) else err)
            return index
        self._moved[id(moved)] = moved
        return moved

    def to_host(self, index: faiss.Index) -> faiss.Index:
        if id(index) not in self._moved:
            return index
        del self._moved[id(index)]
        return self._gpu_to_cpu(index)

    def discard(self, index: faiss.Index) -> None:
        self._moved.pop(id(index), None)

    def knn(self, queries: np.ndarray, embeddings: np.ndarray, k: int):
        return faiss.knn_gpu(
            self.resources,
            queries,
            np.ascontiguousarray(embeddings, dtype=np.float32),
            k,
            metric=faiss.METRIC_INNER_PRODUCT,
        )

    def clustering_index(self, d: int) -> faiss.Index | None:
        # k-means on the GPU even when the IVF's own quantiser (HNSW) must stay on the CPU
        return faiss.GpuIndexFlatIP(self.resources, d)

    def _set_gpu_params(self, index: faiss.Index, search_params: str) -> None:
        faiss.GpuParameterSpace().set_index_parameters(index, search_params)

    def set_params(self, index: faiss.Index, search_params: str) -> None:
        if id(index) in self._moved:
            if search_params:
                self._set_gpu_params(index, _clip_nprobe(search_params))
        else:
            set_search_params(index, search_params)


def _clip_nprobe(search_params: str) -> str:
    parts = []
    for part in search_params.split(","):
        name, _, value = part.partition("=")
        if name == "nprobe":
            value = str(min(int(value), GPU_MAX_NPROBE))
        if name.startswith("quantizer_"):  # the GPU quantiser is flat: no efSearch
            continue
        parts.append(f"{name}={value}")
    return ",".join(parts)


def resolve_device(device: str | CpuDevice = "auto") -> CpuDevice:
    """'auto' (a GPU when faiss sees one), 'cpu', 'cuda', or a Device object (returned as is)."""
    if isinstance(device, CpuDevice):
        return device
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device == "cpu" or (device == "auto" and gpus == 0):
        return CpuDevice()
    if device in ("auto", "cuda"):
        if gpus == 0:
            raise SpecsearchError(
                "--device cuda: faiss sees no GPU (install faiss-gpu, specsearch[gpu])"
            )
        return GpuDevice()
    raise SpecsearchError(f"device {device!r} must be auto, cpu or cuda")
