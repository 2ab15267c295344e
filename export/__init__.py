"""Export (installed as ``mocha_edge.export``): ONNX with the translator stripped, TensorRT engines.

Lands with the export issue; nothing here is wired into the CLI yet.
"""
