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
    reference: Callable[[], ir.Model] | None = None
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("optimizer_cli"))
    # The run's exact-pass oracle (verify.rtol/atol), for passes that check their own rewrite on data.
    tolerance: Tolerance = field(default_factory=Tolerance)


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
    def requirement_problems(cls, config: Any, inputs: RunInputs) -> list[str]:
        """Reasons this pass cannot run, checked before the model is loaded (`config` is this pass's Config)."""
        return []

    def exactness_for(self) -> Exactness:
        """Some passes are exact or approximate depending on their config."""
        return self.exactness
