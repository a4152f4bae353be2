"""optimizer-cli: optimize ONNX models with verified graph rewrites and benchmark the result."""

__version__ = "0.1.0"
