"""Pass registry: importing this package registers every pass."""

from optimizer_cli.passes import cleanup, fuse, lowrank, prune, quantize, reconstruct, trim_padding  # noqa: F401  (registration side effect)
from optimizer_cli.passes.base import (
    PASS_REGISTRY,
    Exactness,
    OptimizationPass,
    PassConfig,
    PassContext,
    RunInputs,
)

__all__ = ["PASS_REGISTRY", "Exactness", "OptimizationPass", "PassConfig", "PassContext", "RunInputs"]
