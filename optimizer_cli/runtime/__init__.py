"""ONNX Runtime sessions and execution-provider discovery."""
