"""The passes a recipe can name, registered explicitly (a test checks every pass module is listed here)."""

from optimizer_cli.passes.base import Exactness, OptimizationPass, PassConfig, PassContext, RunInputs
from optimizer_cli.passes.cleanup import CleanupPass
from optimizer_cli.passes.distill import DistillPass
from optimizer_cli.passes.drop_layers import DropLayersPass
from optimizer_cli.passes.factorize import FactorizePass
from optimizer_cli.passes.fuse import FusePass
from optimizer_cli.passes.prune import PrunePass
from optimizer_cli.passes.prune_heads import PruneHeadsPass
from optimizer_cli.passes.quantize import QuantizePass
from optimizer_cli.passes.reconstruct import ReconstructPass
from optimizer_cli.passes.static_shapes import StaticShapesPass
from optimizer_cli.passes.trim_padding import TrimPaddingPass

PASSES: tuple[type[OptimizationPass], ...] = (
    CleanupPass,
    FusePass,
    TrimPaddingPass,
    PrunePass,
    PruneHeadsPass,
    FactorizePass,
    ReconstructPass,
    DropLayersPass,
    DistillPass,
    QuantizePass,
    StaticShapesPass,
)
PASS_REGISTRY: dict[str, type[OptimizationPass]] = {cls.name: cls for cls in PASSES}
assert len(PASS_REGISTRY) == len(PASSES), "two passes share a name"

__all__ = ["PASSES", "PASS_REGISTRY", "Exactness", "OptimizationPass", "PassConfig", "PassContext", "RunInputs"]
