"""The pass interface: config, context, registry, and the contract each pass declares."""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import onnx_ir as ir
from pydantic import BaseModel, ConfigDict, Field

from optimizer_cli.data import Dataset
from optimizer_cli.errors import UserInputError
from optimizer_cli.verify import Tolerance


class Exactness(str, enum.Enum):
    """Which oracle verifies the pass: exact (outputs within float tolerance) or approximate (drift reported)."""

    EXACT = "exact"
    APPROXIMATE = "approximate"


class PassConfig(BaseModel):
    """Base of every pass config; subclasses add `type: Literal[...]` and their own fields."""

    model_config = ConfigDict(extra="forbid")

    type: str
    label: str | None = Field(
        None, description="Shown in reports instead of the type; `--set passes.LABEL.key=value` addresses the pass."
    )


@dataclass
class PassContext:
    """What a pass may use besides the model: data, a seeded RNG, a temp dir, a logger."""

    calibration: Dataset | None
    verify_data: Dataset
    rng: np.random.Generator
    tmp_dir: Path
    threads: int = 2
    # Loads the run's input model, normalized like the pipeline's (for passes that fit to it).
    load_original: Callable[[], ir.Model] | None = None
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("optimizer_cli"))
    # The run's exact-pass oracle (verify.rtol/atol), for passes that check their own rewrite on data.
    tolerance: Tolerance = field(default_factory=Tolerance)
    # Tells the user where a long step is (e.g. "quantize: weight 37 of 86"); None: silent.
    progress: Callable[[str], None] | None = None


@dataclass
class RunInputs:
    """What the run was given, known before the model loads (for requirement checks)."""

    calibration: str | None = None
    evaluation: str | None = None


# --- what tune may vary (each pass declares its own part of the search space) -------------------------

# Ops whose weights the integer kernels take; the rest of a static QDQ graph is data movement.
COMPUTE_OPS = ("Conv", "MatMul", "Gemm")
DYNAMIC_TARGETS = ("MatMul", "Gemm", "LSTM", "Attention")


@dataclass(frozen=True)
class SearchDimension:
    """A recipe setting `optimize tune` may vary: a trial parameter, the values it takes, and when it applies.

    A pass declares its dimensions (as Olive's passes declare their search defaults); the values must be
    ones its config accepts, since every trial's recipe is validated by the passes' pydantic configs."""

    name: str
    choices: tuple[Any, ...]
    help: str
    # Suggested only when another dimension has one of these values, e.g. {"quantize": ("static",)}.
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def applies(self, params: dict[str, Any]) -> bool:
        return all(params.get(key) in values for key, values in self.when)


@dataclass
class ModelTraits:
    """What the search space is derived from: read from the model (and the run's data and targets) once."""

    ops: dict[str, int]
    depthwise_nodes: list[str]
    prunable_groups: int
    factorizable: int
    mask_input: str | None
    transformer: bool
    has_calibration: bool
    mixed_calibration_shapes: bool
    gpu: bool
    saturating_cpu: bool  # reduce_range=auto already means 7-bit weights here
    notes: list[str] = field(default_factory=list)
    residual_blocks: int = 0  # identity-shortcut blocks drop_layers could remove
    head_attentions: int = 0  # standard multi-head attentions with 2+ heads prune_heads could thin
    symbolic_inputs: bool = False  # a graph input has a dim that is not a number
    one_evaluation_shape: bool = False  # every evaluation sample has the same shapes
    # integer/bool inputs of a few elements with one value in every evaluation sample (freeze_inputs)
    constant_config_inputs: tuple[str, ...] = ()

    @property
    def has_dynamic_targets(self) -> bool:
        return any(self.ops.get(op) for op in DYNAMIC_TARGETS)

    @property
    def has_static_targets(self) -> bool:
        return any(self.ops.get(op) for op in COMPUTE_OPS)


@dataclass
class RecipeContext:
    """What every trial's recipe shares: data, dims, threads, and the nodes mixed precision may keep float."""

    calibration: str | None
    dims: dict[str, int]
    threads: int
    provider: str
    depthwise_nodes: list[str] = field(default_factory=list)
    # quantize mode -> node groups ranked by the fidelity they lose when quantized (attribution), worst first
    ranked_nodes: dict[str, list[list[str]]] = field(default_factory=dict)
    # quantize mode -> how many of the first ranked groups the fidelity goal needs in float (keep_float_fit)
    fitted_keep: dict[str, int] = field(default_factory=dict)
    # quantize mode -> the output cosine the simulation gives the model with every group quantized
    simulated_int8: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


ConfigT = TypeVar("ConfigT", bound=PassConfig)


class OptimizationPass(ir.passes.InPlacePass, Generic[ConfigT]):
    """A recipe step: a graph rewrite with a declared contract.

    Subclasses are `OptimizationPass[TheirConfig]` (so `self.config` is typed, no casts), set `name`,
    `Config`, `exactness`, `contract` (ops touched, what is preserved or approximated and by how much),
    implement `call`, and fill `self.stats` for the report.
    """

    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]]
    exactness: ClassVar[Exactness] = Exactness.EXACT
    contract: ClassVar[str] = ""
    # Trial parameters whose truthy value adds this pass (or, for fuse, its extra fusions) to the plain
    # recipe: tune counts them when it prefers the simpler of two candidates it cannot tell apart.
    search_switches: ClassVar[tuple[str, ...]] = ()
    # Values of this pass's searched knobs that leave the pass as a recipe would have it by default: tune
    # counts the knobs a candidate sets otherwise.
    search_knob_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: ConfigT, ctx: PassContext) -> None:
        super().__init__()
        self.config: ConfigT = config
        self.ctx = ctx
        self.stats: dict[str, Any] = {}
        # Graph inputs this run turned into constants (freeze_inputs): the pipeline's signature check expects
        # them gone from then on. Every other pass keeps the model's signature.
        self.removed_inputs: tuple[str, ...] = ()

    @classmethod
    def calibration_use(cls, config: Any) -> str | None:
        """What needs calibration data with this config (e.g. "static quantization"), or None."""
        return None

    @classmethod
    def host_problems(cls, config: Any) -> list[str]:
        """Reasons this config cannot run well on this machine (CPU features): checked when a run starts,
        not when a recipe is validated, so a recipe means the same on every host."""
        return []

    @classmethod
    def requirement_problems(cls, config: Any, inputs: RunInputs) -> list[str]:
        """Every reason this pass cannot run, checked in one place before the model is loaded."""
        problems = []
        use = cls.calibration_use(config)
        if use is not None and inputs.calibration is None:
            problems.append(f"{use} needs calibration data: give --calib FILE.npz (or --calib random)")
        return problems + cls.host_problems(config)

    @classmethod
    def search_dimensions(cls, traits: ModelTraits) -> list[SearchDimension]:
        """What `optimize tune` may vary in this pass on a model with these traits, in the order they are
        suggested (none: tune never adds the pass). A dimension the model gives nothing to act on is left out."""
        return []

    @classmethod
    def recipe_entries(cls, params: dict[str, Any], ctx: RecipeContext) -> list[dict[str, Any]]:
        """The recipe pass entries a trial's parameters give for this pass (none where they switch it off)."""
        return []

    @classmethod
    def opt_in_dimensions(cls) -> list[SearchDimension]:
        """Dimensions searched only where a space file names them (fine-tuning: minutes per trial); the user
        asked for them, so they do not depend on the model."""
        return []

    @classmethod
    def describe_trial(cls, params: dict[str, Any]) -> str | None:
        """This pass's part of a candidate's one-line name (e.g. "prune 0.3"), or None when it takes no part."""
        return None

    @classmethod
    def resolved_params(cls, params: dict[str, Any], ctx: RecipeContext) -> dict[str, Any]:
        """What the trial's parameters come to once the study's context is known (e.g. how many groups a fitted
        float set kept), added to them for describe_trial; none by default."""
        return {}

    @classmethod
    def fidelity_advice(cls, config: Any, key: str, excluded_tried: bool) -> str | None:
        """The setting of this pass (at `key`, e.g. "passes.2") that trades its savings for fidelity, said when
        the pass loses more than a goal allows (None: the generic advice). `excluded_tried`: the exclude_nodes
        search already failed, so do not suggest it again."""
        return None

    @classmethod
    def search_problems(cls, name: str, choices: tuple[Any, ...]) -> list[str]:
        """Why a space file cannot search these values of dimension `name` on this machine (e.g. a missing
        optional package)."""
        return []

    def refuse(self, model: ir.Model, reason: str) -> ir.passes.PassResult:
        """Leave the model unchanged and say why (in the report's stage details and as a warning): the
        pass-level form of onnxscript's MatchResult.fail."""
        self.stats["skipped"] = reason
        self.ctx.logger.warning("%s left the model unchanged: %s", self.name, reason)
        return ir.passes.PassResult(model, False)

    def calibration(self) -> Dataset:
        """The run's calibration data; the pipeline checked it is there (requirement_problems)."""
        if self.ctx.calibration is None:
            raise UserInputError(f"{self.calibration_use(self.config) or self.name} needs calibration data (--calib)")
        return self.ctx.calibration
