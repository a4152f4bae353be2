"""optimizer-cli: optimize ONNX models with verified graph rewrites and benchmark the result."""

__version__ = "0.1.0"
# The version of every JSON document the tool writes (--json, --report, tune.json, error documents): raised when a
# field changes meaning or goes away, so a pipeline reading them can tell.
SCHEMA_VERSION = 1
