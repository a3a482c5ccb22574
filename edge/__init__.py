"""The camera-side edge: ONNX Runtime gate and lazy FPN, gRPC client, results store, daemon.

Nothing in this package may import torch: edge devices run without it.
"""
