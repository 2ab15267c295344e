"""The deployed path: everything that runs on the device, frame by frame.

- ``engines/``: the engine registry (``ort``, ``trt``, ``torch``, ``torch-cuda``) and the host/device
  engine protocols;
- ``config``: the typed deployment config read from an export's sidecar;
- ``pipeline``: frame -> detections, vectors, identities (native C stages, or ``device_stages`` on a GPU);
- ``cuda``: the CUDA memory/stream calls from Python;
- ``sources`` / ``sinks``: inputs and outputs by URI;
- ``live``: ``mocha-edge run`` (with ``console``, ``display``, ``enroller``).

The PyTorch reference path (training, ``Student``, evaluation) lives outside this package; the ``torch``
engines here wrap it only to compare against it.
"""
