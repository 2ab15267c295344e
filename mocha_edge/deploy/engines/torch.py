"""The ``torch`` and ``torch-cuda`` engines: the student's PyTorch graph up to the raw head outputs.

The reference path: the same checkpoint the export was made from, run by PyTorch (``torch`` on the CPU,
``torch-cuda`` on a CUDA GPU with device-resident buffers, so the CUDA pre/post kernels run on them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mocha_edge.deploy.engines.base import DeviceEngine, HostEngine


class TorchEngine(HostEngine):
    """The student's PyTorch graph up to the raw head outputs, as a pipeline engine (``run(x) -> dict``).

    Its deployment config is the one an export of the same checkpoint at ``imgsz`` (default: the
    checkpoint's) would write, and its matching space the checkpoint's."""

    name = "torch"

    def __init__(
        self, ckpt: str | Path, imgsz: int | None = None, device: str = "cpu", half: bool = False
    ) -> None:
        import torch

        from mocha_edge.deploy.config import DeployConfig
        from mocha_edge.export import contract
        from mocha_edge.export.onnx import RawHead, deployment_facts
        from mocha_edge.infer import Student

        self.torch = torch
        st = Student.load(ckpt, device=device)
        imgsz = int(imgsz or st.imgsz)
        st.imgsz = imgsz
        self.facts = DeployConfig.from_dict(deployment_facts(st, 1, False), ckpt)
        self.space = st.space
        self.net = RawHead(st.model.fuse(verbose=False)).eval()  # Conv+BN folded, as ultralytics predicts
        if half:
            self.net = self.net.half()
        self.torch_device, self.half = device, half
        self.input_shape = (1, 3, imgsz, imgsz)
        self.dtype = np.float16 if half else np.float32
        self.names = list(contract.OUTPUTS)

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        t = self.torch.from_numpy(x).to(self.torch_device)
        with self.torch.inference_mode():
            outs = self.net(t)
        return {n: o.float().cpu().numpy() for n, o in zip(self.names, outs)}


class TorchCudaEngine(TorchEngine, DeviceEngine):
    """:class:`TorchEngine` on a CUDA GPU with device-resident buffers: also a *device engine*
    (``mocha_edge.deploy.device_stages``), so the CUDA pre/post kernels read and write its tensors in place. Its
    own CUDA stream (PyTorch's, non-blocking: the GPU stages queue their copies, kernels and syncs on that
    handle too, which needs cuda-python); buffers are torch tensors, other device memory comes from
    ``mocha_edge.deploy.cuda.cuda_backend``."""

    name = "torch-cuda"

    def __init__(self, ckpt: str | Path, imgsz: int | None = None, half: bool = False) -> None:
        super().__init__(ckpt, imgsz, device="cuda", half=half)
        from mocha_edge.deploy.cuda import cuda_backend
        from mocha_edge.export import contract

        torch = self.torch
        self.cuda = cuda_backend()
        self._stream = torch.cuda.Stream()
        self.stream = int(self._stream.cuda_stream)
        dt = torch.float16 if half else torch.float32
        self._x = torch.zeros(self.input_shape, dtype=dt, device="cuda")
        with torch.inference_mode():
            outs = self.net(self._x)
        self._out = {n: torch.empty_like(o, dtype=torch.float32) for n, o in zip(self.names, outs)}
        bufs = {contract.INPUT: self._x, **self._out}
        self.device = {n: int(t.data_ptr()) for n, t in bufs.items()}
        self.device_shapes = {n: tuple(t.shape) for n, t in bufs.items()}
        self.device_dtypes = {n: np.dtype(np.float16 if t.dtype == torch.float16 else np.float32)
                              for n, t in bufs.items()}  # fmt: skip
        torch.cuda.synchronize()

    def enqueue_device(self) -> None:
        """Queue the graph on the engine's stream: reads the input buffer, writes the output buffers."""
        torch = self.torch
        with torch.cuda.stream(self._stream), torch.inference_mode():
            for n, o in zip(self.names, self.net(self._x)):
                self._out[n].copy_(o)

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.cuda.stream(self._stream):
            self._x.copy_(torch.from_numpy(np.ascontiguousarray(x)))
        self.enqueue_device()
        self._stream.synchronize()
        return {n: o.cpu().numpy() for n, o in self._out.items()}
