"""The passes a recipe can name: the shipped ones, registered explicitly (a test checks every pass module is
listed here), and third-party ones, registered with `register_pass` or through the entry point group
`optimizer_cli.passes` of an installed package (each entry point names a pass class)."""

from collections.abc import Callable

from optimizer_cli.passes.base import Exactness, OptimizationPass, PassConfig, PassContext, RunInputs
from optimizer_cli.passes.cleanup import CleanupPass
from optimizer_cli.passes.distill import DistillPass
from optimizer_cli.passes.drop_layers import DropLayersPass
from optimizer_cli.passes.factorize import FactorizePass
from optimizer_cli.passes.freeze_inputs import FreezeInputsPass
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
    FreezeInputsPass,
)
PASS_REGISTRY: dict[str, type[OptimizationPass]] = {cls.name: cls for cls in PASSES}
assert len(PASS_REGISTRY) == len(PASSES), "two passes share a name"

ENTRY_POINT_GROUP = "optimizer_cli.passes"
# Called after the registry changes (the recipe schema rebuilds its union of pass configs).
_ON_CHANGE: list[Callable[[], None]] = []
# Entry points that could not be registered, as "name (distribution): why": said by `optimize passes`.
PLUGIN_PROBLEMS: list[str] = []


def on_registry_change(listener: Callable[[], None]) -> None:
    _ON_CHANGE.append(listener)


def _check_pass_class(cls: object) -> str | None:
    """Why `cls` cannot be a pass (None: it can)."""
    if not isinstance(cls, type) or not issubclass(cls, OptimizationPass):
        return "not a subclass of optimizer_cli.passes.OptimizationPass"
    name = getattr(cls, "name", None)
    config = getattr(cls, "Config", None)
    if not isinstance(name, str) or not name:
        return "has no `name`"
    if not isinstance(config, type) or not issubclass(config, PassConfig):
        return "its `Config` is not a subclass of PassConfig"
    field = config.model_fields.get("type")
    if field is None or field.default != name:
        return f"its Config's `type` must be Literal['{name}'] with that default"
    if name in PASS_REGISTRY and PASS_REGISTRY[name] is not cls:
        return f"a pass named '{name}' is already registered ({PASS_REGISTRY[name].__module__})"
    return None


def register_pass(cls: type[OptimizationPass]) -> type[OptimizationPass]:
    """Make a third-party pass available to recipes, `optimize passes` and validation (usable as a decorator).
    Refuses, with a TypeError saying why, a class that is not a proper pass or whose name is taken."""
    problem = _check_pass_class(cls)
    if problem is not None:
        raise TypeError(f"register_pass({getattr(cls, '__name__', cls)!r}): {problem}")
    PASS_REGISTRY[cls.name] = cls
    for listener in _ON_CHANGE:
        listener()
    return cls


def unregister_pass(name: str) -> None:
    """Remove a third-party pass (the shipped ones stay)."""
    if name in {cls.name for cls in PASSES}:
        raise ValueError(f"'{name}' is a shipped pass")
    if PASS_REGISTRY.pop(name, None) is not None:
        for listener in _ON_CHANGE:
            listener()


def load_entry_points() -> list[str]:
    """Register the passes installed packages declare in the entry point group; what failed is kept in
    PLUGIN_PROBLEMS (a broken plugin never stops the tool) and returned."""
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        where = f"{entry.name} ({entry.dist.name if entry.dist else entry.value})"
        try:
            cls = entry.load()
            problem = _check_pass_class(cls)
            if problem is None:
                register_pass(cls)
                continue
        except Exception as exc:  # the plugin's own import error: report it, do not crash
            problem = f"cannot load {entry.value}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if f"{where}: {problem}" not in PLUGIN_PROBLEMS:
            PLUGIN_PROBLEMS.append(f"{where}: {problem}")
    return list(PLUGIN_PROBLEMS)


__all__ = [
    "ENTRY_POINT_GROUP",
    "PASSES",
    "PASS_REGISTRY",
    "Exactness",
    "OptimizationPass",
    "PassConfig",
    "PassContext",
    "RunInputs",
    "load_entry_points",
    "register_pass",
    "unregister_pass",
]
