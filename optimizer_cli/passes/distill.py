"""distill (approximate, improves fidelity): fine-tune the float weights so the outputs follow the original.

The current (pruned, factorized, layer-dropped) model is the student, the run's input model the
teacher. The student becomes a torch module through onnx2torch (passes/_onnx_torch.py); its float
weights are trained with Adam to match the teacher's outputs (MSE relative to the teacher's mean square,
1 - cosine, or KL of temperature-softened logits) on unlabelled inputs: the calibration data or a
larger `train_data` set. The teacher's outputs come from onnxruntime, once per sample.
A part of the data (`holdout`) is never trained on: the trained weights are kept only if the held-out
fidelity (every output's mean cosine vs the teacher, measured in onnxruntime on the rewritten model)
is higher than before; otherwise the model is left as it was, and the stats say so.
Contract: changes only the values of float initializers that are weights, biases, normalization
scales or embedding tables; graph structure and shapes are unchanged (lr 0 is exact, tested).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field

from optimizer_cli.analysis.graph import output_names
from optimizer_cli.data import Dataset, data_problem, load_dataset
from optimizer_cli.errors import UserInputError
from optimizer_cli.passes import _onnx_torch as bridge
from optimizer_cli.passes._graph import is_large, lift_constants
from optimizer_cli.passes.base import Exactness, OptimizationPass, PassConfig, RecipeContext, RunInputs, SearchDimension
from optimizer_cli.runtime.session import SessionConfig, run_model
from optimizer_cli.verify import min_mean_cosine, same_layout


class DistillConfig(PassConfig):
    type: Literal["distill"] = "distill"
    steps: int = Field(300, ge=0, description="Optimizer steps (batches) at most.")
    time_budget_s: float | None = Field(None, gt=0, description="Stop training after this many seconds.")
    learning_rate: float = Field(1e-4, ge=0, description="Adam's learning rate (0 leaves every weight unchanged).")
    batch_size: int = Field(8, ge=1, description="Samples per step.")
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="Learning rate over the steps: cosine decay to zero, or constant."
    )
    loss: Literal["mse", "cosine", "kl"] = Field(
        "mse", description="mse: relative to the teacher's mean square; cosine: 1 - cosine per sample; kl: on logits."
    )
    temperature: float = Field(2.0, gt=0, description="Softening of logits for loss=kl.")
    outputs: list[str] = Field([], description="Outputs matched (default: every float output).")
    train_data: str | None = Field(
        None, description="Unlabelled training inputs (same formats as --data); default: the calibration data."
    )
    holdout: float = Field(0.2, gt=0, lt=1, description="Share of the samples never trained on; they decide.")
    samples: int | None = Field(None, ge=2, description="Use at most this many samples (unset: all).")
    seed: int = Field(0, ge=0, description="Seeds the batch order.")
    eval_every: int = Field(
        100, ge=0, description="Measure held-out fidelity every this many steps and keep the best weights (0: never)."
    )


class DistillPass(OptimizationPass[DistillConfig]):
    name = "distill"
    Config = DistillConfig
    exactness = Exactness.APPROXIMATE
    contract = "fine-tunes float weights (structure unchanged) toward the original model's outputs, kept if held-out fidelity rises"
    search_switches = ("distill",)

    @classmethod
    def opt_in_dimensions(cls) -> list[SearchDimension]:
        # Fine-tuning costs minutes per trial on a CPU: searched only where a space file asks for it.
        help_text = "fine-tune the compressed model toward the original (the distill extra)"
        return [SearchDimension("distill", (False, True), help_text)]

    @classmethod
    def search_problems(cls, name: str, choices: tuple[Any, ...]) -> list[str]:
        if name != "distill" or True not in choices:
            return []
        missing = bridge.missing_packages()
        return [f'distill needs {" and ".join(missing)}: pip install -e ".[distill]"'] if missing else []

    @classmethod
    def recipe_entries(cls, params: dict[str, Any], ctx: RecipeContext) -> list[dict[str, Any]]:
        return [{"type": "distill"}] if params.get("distill") else []

    @classmethod
    def describe_trial(cls, params: dict[str, Any]) -> str | None:
        return "distill" if params.get("distill") else None

    @classmethod
    def calibration_use(cls, config: DistillConfig) -> str | None:
        return None if config.train_data else "distill (unlabelled training inputs)"

    @classmethod
    def requirement_problems(cls, config: DistillConfig, inputs: RunInputs) -> list[str]:
        problems = super().requirement_problems(config, inputs)
        missing = bridge.missing_packages()
        if missing:
            problems.append(f'distill needs {" and ".join(missing)}: pip install -e ".[distill]" (the optional extra)')
        if config.train_data is not None:
            problem = data_problem(config.train_data)
            if problem:
                problems.append(f"distill.train_data: {problem}")
        return problems

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg = self.config
        if is_large(model):
            return self.refuse(
                model, "the model's weights are over 1.8 GB: fine-tuning them on this CPU is not offered"
            )
        if self.ctx.load_original is None:
            raise UserInputError("distill needs the original model (run it through the pipeline)")
        lift_constants(model)  # weights held in Constant nodes become initializers that can be trained
        data = self._data(model)
        n_hold = max(1, round(len(data) * cfg.holdout))
        if len(data) - n_hold < 1:
            return self.refuse(model, f"{len(data)} samples: too few to train on and hold some out")
        train, hold = data.feeds[:-n_hold], data.feeds[-n_hold:]
        outputs = self._outputs(model)
        teacher = self.ctx.load_original()
        session = SessionConfig(threads=self.ctx.threads)
        targets = run_model(teacher, train, session, outputs)
        held_targets = run_model(teacher, hold, session, outputs)
        before = min_mean_cosine(held_targets, run_model(model, hold, session, outputs))
        trainable = bridge.trainable_initializers(model)
        binds = bridge.bindings(model, trainable)
        if not binds:
            return self.refuse(model, "no float weight of this model maps to a trainable torch tensor")
        module, params = bridge.trainable_module(model, binds)
        index = [output_names(model).index(n) for n in outputs]
        run = self._train(module, params, model, (train, targets), (hold, held_targets), index)
        previous = bridge.write_weights(model, bridge.module_weights(module, binds))
        after = min_mean_cosine(held_targets, run_model(model, hold, session, outputs))
        kept = after > before
        if not kept:
            bridge.restore_weights(model, previous)
        self.stats.update(
            {
                "trained_tensors": f"{len(binds)} of {len(trainable)}",
                "samples": f"{len(train)} trained, {len(hold)} held out",
                "steps": run.steps,
                "train_seconds": round(run.seconds, 1),
                "loss": f"{run.losses[0]:.4g} -> {run.losses[-1]:.4g}" if run.losses else "-",
                "checkpoint": f"step {run.best_step} (best held-out)" if run.best_step is not None else "last step",
                "heldout_cosine": f"{before:.5f} -> {after:.5f}",
                "kept": "yes" if kept else "no (held-out fidelity did not rise)",
            }
        )
        return ir.passes.PassResult(model, kept)

    def _data(self, model: ir.Model) -> Dataset:
        cfg = self.config
        if cfg.train_data is not None:
            data = load_dataset(cfg.train_data, model, limit=cfg.samples)
        else:
            data = self.calibration()
        return data.take(cfg.samples) if cfg.samples else data

    def _outputs(self, model: ir.Model) -> list[str]:
        floats = [v.name or "" for v in model.graph.outputs if v.dtype == ir.DataType.FLOAT]
        if not self.config.outputs:
            if not floats:
                raise UserInputError("distill: the model has no float32 output to match")
            return floats
        unknown = [n for n in self.config.outputs if n not in floats]
        if unknown:
            raise UserInputError(
                f"distill.outputs: {', '.join(unknown)} not among the float outputs ({', '.join(floats)})"
            )
        return list(self.config.outputs)

    def _train(
        self,
        module: Any,
        params: list[Any],
        model: ir.Model,
        train: tuple[list[dict[str, np.ndarray]], list[list[np.ndarray]]],
        hold: tuple[list[dict[str, np.ndarray]], list[list[np.ndarray]]],
        index: list[int],
    ) -> _Run:
        import torch

        cfg = self.config
        torch.manual_seed(cfg.seed)
        torch.set_num_threads(self.ctx.threads)
        names = [v.name for v in model.graph.inputs]
        batches = _batches(model, *train, names, cfg.batch_size, np.random.default_rng(cfg.seed))
        held = _batches(model, *hold, names, cfg.batch_size, None)()
        optimizer = torch.optim.Adam(params, lr=cfg.learning_rate)
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.steps))
        run = _Run(start=time.perf_counter())
        checkpoint = _Checkpoint(params, _held_out_cosine(module, held, index) if cfg.eval_every else None)
        while run.steps < cfg.steps and not run.out_of_time(cfg.time_budget_s):
            for chunks in batches():
                if run.steps >= cfg.steps or run.out_of_time(cfg.time_budget_s):
                    break
                optimizer.zero_grad()
                total = 0.0
                for inputs, wanted in chunks:
                    out = _forward(module, inputs)
                    loss = sum(_loss(cfg, out[i], torch.from_numpy(t)) for i, t in zip(index, wanted, strict=True))
                    (loss / len(chunks)).backward()
                    total += float(loss.detach()) / len(chunks)
                optimizer.step()
                if cfg.schedule == "cosine":
                    decay.step()
                run.losses.append(total)
                run.steps += 1
                if cfg.eval_every and run.steps % cfg.eval_every == 0:
                    checkpoint.offer(run.steps, _held_out_cosine(module, held, index))
                if self.ctx.progress and run.steps % 10 == 0:
                    self.ctx.progress(
                        f"distill: step {run.steps} of {cfg.steps}, loss {total:.4g}"
                        + (f", held-out cosine {checkpoint.last:.4f}" if checkpoint.last is not None else "")
                    )
        if cfg.eval_every and run.steps % cfg.eval_every:
            checkpoint.offer(run.steps, _held_out_cosine(module, held, index))
        run.seconds = time.perf_counter() - run.start
        run.best_step = checkpoint.restore()
        return run


class _Checkpoint:
    """The weights at the step whose held-out cosine (in torch) was best, step 0 included."""

    def __init__(self, params: list[Any], cosine: float | None) -> None:
        self.params, self.best, self.last, self.step = params, cosine, cosine, 0
        self.saved = [p.detach().clone() for p in params]

    def offer(self, step: int, cosine: float) -> None:
        self.last = cosine
        if self.best is None or cosine > self.best:
            self.best, self.step = cosine, step
            self.saved = [p.detach().clone() for p in self.params]

    def restore(self) -> int | None:
        if self.best is None:
            return None  # no held-out evaluation during training: the last weights stand
        import torch

        with torch.no_grad():
            for p, saved in zip(self.params, self.saved, strict=True):
                p.copy_(saved)
        return self.step


@dataclass
class _Run:
    start: float
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    best_step: int | None = None

    def out_of_time(self, budget: float | None) -> bool:
        return budget is not None and time.perf_counter() - self.start > budget


def _forward(module: Any, inputs: list[np.ndarray]) -> tuple[Any, ...]:
    import torch

    out = module(*[torch.from_numpy(a) for a in inputs])
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _held_out_cosine(
    module: Any, chunks: list[list[tuple[list[np.ndarray], list[np.ndarray]]]], index: list[int]
) -> float:
    """Every matched output's mean cosine over the held-out rows, the worst output's (for checkpoints)."""
    import torch

    # Per output: one [reference row] / [student row] pair per held-out sample (stacked chunks split by row).
    reference: list[list[list[np.ndarray]]] = [[] for _ in index]
    student: list[list[list[np.ndarray]]] = [[] for _ in index]
    with torch.no_grad():
        for step in chunks:
            for inputs, wanted in step:
                out = _forward(module, inputs)
                for j, (i, t) in enumerate(zip(index, wanted, strict=True)):
                    rows = out[i].shape[0] if out[i].ndim > 1 else 1
                    reference[j].extend([r] for r in t.reshape(rows, -1))
                    student[j].extend([r] for r in out[i].numpy().reshape(rows, -1))
    if not index or not all(reference):
        return 1.0
    return min(min_mean_cosine(r, s) for r, s in zip(reference, student, strict=True))


def _loss(cfg: DistillConfig, student: Any, teacher: Any) -> Any:
    import torch

    if cfg.loss == "kl":
        t = cfg.temperature
        log_p = torch.log_softmax(student / t, dim=-1)
        q = torch.softmax(teacher / t, dim=-1)
        return torch.nn.functional.kl_div(log_p, q, reduction="batchmean") * t * t
    if cfg.loss == "cosine":
        s, r = student.reshape(student.shape[0], -1), teacher.reshape(teacher.shape[0], -1)
        return (1 - torch.nn.functional.cosine_similarity(s, r, dim=1)).mean()
    return torch.mean((student - teacher) ** 2) / (torch.mean(teacher**2) + 1e-12)


def _stackable(model: ir.Model, feeds: list[dict[str, np.ndarray]]) -> bool:
    """Samples can be concatenated along axis 0: every input and output has a symbolic first dim and
    every sample has the same shapes."""
    values = [*model.graph.inputs, *model.graph.outputs]
    if any(v.shape is None or len(v.shape) == 0 or isinstance(v.shape[0], int) for v in values):
        return False
    return same_layout(feeds)


def _batches(
    model: ir.Model,
    feeds: list[dict[str, np.ndarray]],
    targets: list[list[np.ndarray]],
    names: list[str | None],
    batch_size: int,
    rng: np.random.Generator | None,
) -> Any:
    """A callable giving one epoch of steps (shuffled by `rng`; None: in order); a step is chunks of (inputs, targets) whose losses add up:
    one concatenated chunk where samples stack, else one chunk per sample (gradient accumulation)."""
    stack = _stackable(model, feeds)

    def epoch() -> list[list[tuple[list[np.ndarray], list[np.ndarray]]]]:
        order = rng.permutation(len(feeds)) if rng is not None else np.arange(len(feeds))
        steps = []
        for lo in range(0, len(order), batch_size):
            picked = order[lo : lo + batch_size]
            chunks = [([feeds[i][n] for n in names if n], targets[i]) for i in picked]
            if stack and len(chunks) > 1:
                inputs = [np.concatenate(parts) for parts in zip(*(c[0] for c in chunks), strict=True)]
                wanted = [np.concatenate(parts) for parts in zip(*(c[1] for c in chunks), strict=True)]
                chunks = [(inputs, wanted)]
            steps.append(chunks)
        return steps

    return epoch
