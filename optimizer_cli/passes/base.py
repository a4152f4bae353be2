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

    def __init__(self, config: ConfigT, ctx: PassContext) -> None:
        super().__init__()
        self.config: ConfigT = config
        self.ctx = ctx
        self.stats: dict[str, Any] = {}

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
