"""The two engine protocols of the deployed pipeline.

A :class:`HostEngine` takes a preprocessed input array and returns its outputs as host arrays. A
:class:`DeviceEngine` also keeps its input and outputs in device memory, so the CUDA pre/post-processing
(``mocha_edge.deploy.device_stages``) letterboxes into its input and decodes, suppresses and pools straight
from its outputs; only detections come back. Which one an engine is, is its class, never probed attributes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from mocha_edge.errors import MochaError

if TYPE_CHECKING:
    import numpy as np

    from mocha_edge.deploy.config import DeployConfig
    from mocha_edge.deploy.cuda import CudaBackend, MemoryPlan
    from mocha_edge.space import VectorSpace


class EngineError(MochaError):
    """An engine cannot be created or cannot run (missing library, no GPU, not a mocha-edge export...)."""


class HostEngine(ABC):
    """``run(x) -> {contract output name: array}`` on host memory.

    ``input_shape`` is ``(B, 3, S, S)``, ``dtype`` the input's NumPy dtype. ``facts`` is the deployment
    config of the model it runs (``None`` when the caller supplies one), ``space`` its matching space.
    ``cpu_threads``: CPU threads it keeps busy between runs (the pipeline sizes its native pool around it).
    """

    name: str = ""  # registry name
    input_shape: tuple[int, ...]
    dtype: Any
    facts: DeployConfig | None = None
    space: VectorSpace | None = None
    threads: int | None = None
    cpu_threads: int = 0

    @abstractmethod
    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs by contract name for one preprocessed input (arrays may be reused by the next call)."""

    def close(self) -> None:  # noqa: B027 - most engines hold nothing to free
        """Free what the engine holds (GPU memory, sessions)."""

    def __enter__(self) -> HostEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DeviceEngine(HostEngine):
    """A :class:`HostEngine` whose buffers live on a CUDA device.

    ``cuda``: the :class:`~mocha_edge.deploy.cuda.CudaBackend` that owns its memory; ``stream``: the CUDA
    stream handle (int) all its work is queued on (copies, kernels and syncs of the GPU stages go there
    too); ``device``: ``{contract name: device pointer}`` for the input and every output (contiguous);
    ``device_shapes`` / ``device_dtypes``: their shapes and NumPy dtypes; ``zero_copy``: the input is mapped
    host memory (nothing to upload); ``memory``: the :class:`~mocha_edge.deploy.cuda.MemoryPlan` it follows.
    """

    cuda: CudaBackend
    stream: int
    device: dict[str, int]
    device_shapes: dict[str, tuple[int, ...]]
    device_dtypes: dict[str, Any]
    zero_copy: bool = False
    memory: MemoryPlan | None = None  # the memory plan its buffers follow (None: the GPU's default plan)

    @abstractmethod
    def enqueue_device(self) -> None:
        """Queue one inference reading ``device[INPUT]`` and writing the outputs, on ``stream`` (async)."""
