"""`optimize tune`: the fastest candidate that meets every goal, found with Optuna, then proven.

1. The space comes from the model (search.space); each trial's parameters become a recipe
   (search.candidates.recipe_for) built through the normal, verified pipeline.
2. Cheap first: a candidate's fidelity is measured on the evaluation data (never overlapping the
   calibration data); one that misses a goal is never timed. One that meets them is timed against the
   original, interleaved in one process (paired ratios).
3. Optuna (multi-objective: speedup up, worst-output cosine up; TPE, or NSGA-II) proposes the next trial.
   Its storage is a journal file in the study folder, so an interrupted study resumes and a finished one is
   re-reported without re-running. The sampler is re-seeded from the trial count before every proposal: a
   resumed study proposes what the uninterrupted one would have, given the same results.
4. Honest winner: the best few candidates are re-timed together, interleaved with the original (noise hits
   all alike: no winner's curse). The winner is the fastest that meets every goal (speed goals included,
   read on this final timing) and whose speedup's 95% interval lies above 1; otherwise there is none.
"""

from __future__ import annotations

import functools
import json
import shlex
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimizer_cli import SCHEMA_VERSION
from optimizer_cli.bench.gate import Gate, goal_holds, metric_value, show_value
from optimizer_cli.errors import UserInputError, first_line
from optimizer_cli.passes import PASS_REGISTRY
from optimizer_cli.runtime.targets import parse_target
from optimizer_cli.search.candidates import (
    REFERENCE,
    BuildJob,
    DataRef,
    RecipeContext,
    TimeJob,
    build_and_score,
    candidate_target,
    recipe_for,
    summary,
    time_candidates,
)
from optimizer_cli.search.space import Dimension, describe, fewer_threads_dimension, suggest
from optimizer_cli.search.study_folder import check_study_folder, read_json, read_marker, write_marker

SPEED_METRICS = {
    "speedup",
    "speedup_ci_low",
    "speedup_ci_high",
    "p90_speedup",
    "p99_speedup",
    "p50_ms",
    "p90_ms",
    "p99_ms",
}
FINALISTS = 6
FINAL_ROUNDS = 16
EXTEND = 3  # an inconclusive final timing is repeated once with this many times the rounds and the budget
# Consecutive proposals already tried before the search calls the space exhausted.
EXHAUSTED_AFTER = 100  # random proposals in a row that were all tried: the space is (nearly) exhausted
CONFIG_FILE = "tune-config.json"
JOURNAL_FILE = "study.journal"
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")  # where fp16 is a quantize mode
STUDY_ID_ATTR = "optimize_study_id"  # the journal's copy of the marker's id: a foreign journal lacks it


@dataclass
class TuneSettings:
    model: Path
    goals: list[Gate]
    ctx: RecipeContext
    data: DataRef
    dims: list[Dimension]
    study_dir: Path
    budget_s: float | None = None
    trials: int | None = None
    sampler: str = "tpe"
    seed: int = 0
    resume: bool = False
    model_sha256: str = ""
    notes: list[str] = field(default_factory=list)  # said before the search, and kept in tune.json
    trial_seconds: float = 20.0  # timing budget of one search trial
    final_seconds: float = 60.0  # timing budget of the final re-timing
    report_only: bool = False  # re-reporting a finished study (errors name --report-only, not --resume)

    @property
    def targets(self) -> tuple[str, ...]:
        """The run targets the study considers (the `target` dimension, or the reference alone)."""
        dim = next((d for d in self.dims if d.name == "target"), None)
        return tuple(dim.choices) if dim is not None else (self.ctx.provider,)

    def identity(self) -> dict[str, Any]:
        """What a resumed study must share with the one it continues."""
        return {
            "model_sha256": self.model_sha256,
            "goals": [g.expression for g in self.goals],
            "space": describe(self.dims),
            "provider": self.ctx.provider,
            "threads": self.ctx.threads,
            "evaluation": self.data.evaluation,
            "evaluation_samples": self.data.samples,
            "calibration": self.ctx.calibration,
        }


@dataclass
class Progress:
    """What the display shows after every trial."""

    done: int
    total: int | None
    seconds_left: float | None
    last: dict[str, Any]
    best: dict[str, Any] | None


@dataclass
class TuneState:
    records: dict[int, dict[str, Any]] = field(default_factory=dict)  # trial number -> tune.json trial entry
    by_params: dict[str, int] = field(default_factory=dict)
    # Proposals already tried, told the first trial's outcome: listed in tune.json so no trial number is missing.
    duplicates: dict[int, dict[str, Any]] = field(default_factory=dict)
    elapsed_before: float = 0.0
    original_p50_ms: float | None = None


def _key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def fidelity_goals(goals: list[Gate]) -> list[Gate]:
    return [g for g in goals if g.metric not in SPEED_METRICS]


def check_goals(goals: list[Gate], row: dict[str, Any], sizes: tuple[int, int] | None = None) -> list[str]:
    """Reasons the row misses goals (empty: all met); a goal whose metric the row lacks is the user's error.
    `sizes` (original, candidate bytes) answers size_ratio."""
    bench: dict[str, Any] = {"rows": [row]}
    if sizes is not None:
        bench.update(original_bytes=sizes[0], optimized_bytes=sizes[1])
    misses = []
    for gate in goals:
        held, value = goal_holds(gate, row, bench)
        if not held:
            misses.append(f"{gate.metric} {show_value(gate.metric, value)} misses goal {gate.expression}")
    return misses


# Per-sample rates, shown in percent (as goals write them: 'accuracy_drop<=1%'); every other figure is shown as
# the fraction or ratio it is. One convention for messages, the table and the page.
# Figures that move in steps of one evaluation sample, and the value that means "no sample changed".
PER_SAMPLE_PERFECT = {"accuracy_drop": 0.0, "top1_agreement": 1.0}


def resolution_notes(goals: list[Gate], samples: int) -> list[str]:
    """Goals finer than one evaluation sample: on n samples a per-sample rate moves in steps of 1/n, so a goal
    with less slack than one step allows no sample to change. Said before the search, with the step."""
    notes = []
    step = 1.0 / samples if samples else 1.0
    for gate in goals:
        perfect = PER_SAMPLE_PERFECT.get(gate.metric)
        if perfect is None:
            continue
        slack = abs(gate.threshold - perfect)
        if 0 < slack < step:
            notes.append(
                f"--goal '{gate.expression}': on {samples} evaluation samples 1 sample = {100 * step:.2f}%, so this goal allows no sample to change "
                f"(give --data more samples: {int(1 / slack) + 1} or more make one sample less than the goal's slack)"
            )
    return notes


# --- the study --------------------------------------------------------------------------------------


def _sampler(settings: TuneSettings, n_done: int) -> Any:
    import optuna

    seed = settings.seed + n_done
    if settings.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    # Few startup trials: the enqueued starting points already cover the space's corners.
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=6)


def open_study(settings: TuneSettings) -> Any:
    """The study's Optuna study: a new one in a new (or empty) folder, marked first; or, resuming, the one the
    folder's marker names, after its files are checked (a foreign or corrupted folder is the user's error)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config_path = settings.study_dir / CONFIG_FILE
    journal = settings.study_dir / JOURNAL_FILE
    if settings.resume:
        # Nothing is created or written before the folder shows it is this tool's study.
        check_study_folder(settings.study_dir, True, {})
        study_id = read_marker(settings.study_dir)
        saved = read_json(config_path, CONFIG_FILE, ("identity",))
        if not isinstance(saved["identity"], dict):
            raise UserInputError(f"the study's {CONFIG_FILE} is corrupted (identity is not an object)", config_path)
        if not journal.is_file():
            raise UserInputError("the study has no journal to resume (it never started a trial)", journal)
        differs = [k for k, v in settings.identity().items() if saved["identity"].get(k) != v]
        if differs:
            flag = "--report-only" if settings.report_only else "--resume"
            raise UserInputError(f"{flag}: this study was run with another {', '.join(differs)}", settings.study_dir)
        return _load_journal(journal, study_id)
    check_study_folder(settings.study_dir, False, {})  # the CLI checked already; the library is called directly too
    study_id = write_marker(settings.study_dir)
    storage = JournalStorage(JournalFileBackend(str(journal)))
    study = optuna.create_study(study_name="tune", storage=storage, directions=["maximize", "maximize"])
    study.set_user_attr(STUDY_ID_ATTR, study_id)
    _write_config(settings, 0.0)
    return study


def _load_journal(journal: Path, study_id: str) -> Any:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    _check_journal_lines(journal)
    try:
        study = optuna.load_study(study_name="tune", storage=JournalStorage(JournalFileBackend(str(journal))))
        owner = study.user_attrs.get(STUDY_ID_ATTR)
    except Exception as exc:  # Optuna reports a broken journal with many exception types; all mean "unreadable"
        raise UserInputError(
            f"the study's journal is corrupted or not a tune study's ({type(exc).__name__}: {first_line(exc, 120)})",
            journal,
        ) from None
    if owner != study_id:
        raise UserInputError("the journal belongs to another study (its id is not the marker file's)", journal)
    return study


def _check_journal_lines(journal: Path) -> None:
    """Every line a complete JSON object. Optuna takes a broken last line for a write under way and appends after
    it, which breaks the journal for good: a truncated or damaged one is refused before Optuna reads it."""
    try:
        raw = journal.read_bytes()
    except OSError as exc:
        raise UserInputError(f"the study's journal cannot be read ({type(exc).__name__})", journal) from None
    if raw and not raw.endswith(b"\n"):
        raise UserInputError("the study's journal is truncated (its last line is incomplete)", journal)
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            entry = json.loads(line)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
            entry = None
        if not isinstance(entry, dict) or "op_code" not in entry:
            raise UserInputError(
                f"the study's journal is corrupted (line {number} is not an Optuna log entry)", journal
            )


def _write_config(settings: TuneSettings, elapsed: float, extra: dict[str, Any] | None = None) -> None:
    path = settings.study_dir / CONFIG_FILE
    saved = read_json(path, CONFIG_FILE) if path.exists() else {}
    saved.update({"identity": settings.identity(), "elapsed_s": elapsed, **(extra or {})})
    path.write_text(json.dumps(saved, indent=2, default=str))


# What a told trial's record holds (a duplicate's holds only the first four): a record without them is corrupt.
RECORD_KEYS = ("number", "state", "params", "reason", "recipe_summary", "recipe", "fidelity", "speedup")


def _checked_record(record: Any, number: int, journal: Path) -> dict[str, Any]:
    keys = RECORD_KEYS[:4] if isinstance(record, dict) and record.get("state") == "duplicate" else RECORD_KEYS
    if not isinstance(record, dict) or any(k not in record for k in keys) or not isinstance(record["params"], dict):
        raise UserInputError(f"trial {number}'s record in the journal is corrupted or not from optimize tune", journal)
    if record["state"] in ("built", "timed") and not isinstance(record.get("model_path"), str):
        raise UserInputError(f"trial {number}'s record in the journal names no model file", journal)
    return record


def restore(study: Any, settings: TuneSettings, write: bool = True) -> TuneState:
    """The records of the trials a previous run finished; trials it left running (Ctrl-C) are marked failed
    (`write`; a re-report reads the study and leaves its journal as it was)."""
    import optuna

    state = TuneState()
    saved = read_json(settings.study_dir / CONFIG_FILE, CONFIG_FILE)
    try:
        state.elapsed_before = float(saved.get("elapsed_s", 0.0))
    except (TypeError, ValueError):
        raise UserInputError(
            f"the study's {CONFIG_FILE} is corrupted (elapsed_s)", settings.study_dir / CONFIG_FILE
        ) from None
    state.original_p50_ms = saved.get("original_p50_ms")
    journal = settings.study_dir / JOURNAL_FILE
    for trial in study.get_trials(deepcopy=False):
        if trial.state == optuna.trial.TrialState.RUNNING and not write:
            continue
        if trial.state == optuna.trial.TrialState.RUNNING:
            # Interrupted mid-trial: failed in the journal, and its proposal asked again first, so the resumed
            # study goes on as the uninterrupted one would have.
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
            if trial.params:
                study.enqueue_trial(trial.params, skip_if_exists=False)
            continue
        if "record" not in trial.user_attrs:
            continue
        record = _checked_record(trial.user_attrs["record"], trial.number, journal)
        if record["state"] != "duplicate":
            state.records[trial.number] = record
            state.by_params.setdefault(_key(record["params"]), trial.number)
        else:
            state.duplicates[trial.number] = record
    return state


def _wanted_or_first(want: dict[str, Any], dim: Dimension) -> Any:
    # (a choice may be None, e.g. threads: a missing key is not a wish for None)
    return want[dim.name] if dim.name in want and want[dim.name] in dim.choices else dim.choices[0]


def _suggest_with(trial: Any, dim: Dimension) -> Any:
    return trial.suggest_categorical(dim.name, list(dim.choices))


def _compiles(target: str | None) -> bool:
    """A target whose engine is not onnxruntime's CPU EP (OpenVINO, TensorRT: they compile the graph)."""
    return target is not None and parse_target(target).ep_name != "CPUExecutionProvider"


def predicted_int8_misses(ctx: RecipeContext | None, cosine_floor: float) -> set[str]:
    """Starting points the mixed-precision simulation already says miss the fidelity goal: 'static' (every
    node int8: simulated cosine below the floor by more than the floor's headroom, PP-OCRv4 det 0.84 for a
    0.99 goal) and 'keep_float_k' (4 float groups, where the fit needs more). They stay in the space."""
    if ctx is None:
        return set()
    misses = set()
    if ctx.simulated_int8.get("static", 1.0) < cosine_floor - (1.0 - cosine_floor):
        misses.add("static")
    if ctx.fitted_keep.get("static", 0) > STARTING_KEEP_FLOAT:
        misses.add("keep_float_k")
    if "static" in ctx.simulated_int8 and "static" not in ctx.fitted_keep:
        # No fit reaches the goal: a fitted trial would be the all-int8 model, a k-float one close to it.
        misses |= {"keep_float_fit", "keep_float_k"}
    return misses


STARTING_KEEP_FLOAT = 4  # float groups of the 'a few layers float' starting point


def starting_points(
    dims: list[Dimension], ctx: RecipeContext | None = None, cosine_floor: float = 0.99
) -> list[dict[str, Any]]:
    """What a person would try first (the shipped recipes' shapes), so even a small budget sees them; with the
    mixed-precision ranking (ctx), none it predicts to miss the goal."""
    names = {d.name: d for d in dims}
    misses = predicted_int8_misses(ctx, cosine_floor)
    modes = names["quantize"].choices if "quantize" in names else ("none",)
    # The exact floor first (clean-up and fusions only): often faster already, and the fidelity reference. On
    # every run target: another engine alone can be several times faster than any graph rewrite on the CPU EP.
    targets = names["target"].choices if "target" in names else (None,)
    wanted: list[dict[str, Any]] = [
        {"quantize": "none", **({"target": target} if target else {})} for target in targets
    ]
    compiling = [t for t in targets if _compiles(t)]
    fixed = {"static_shapes": True} if "static_shapes" in names else {}  # shapes fixed where they can be
    if fixed:
        # An engine that compiles the graph (OpenVINO) can be several times faster on fixed input shapes than on
        # symbolic ones (measured on an AMX Xeon: PP-OCRv4 det 2.6x -> 3.6x): each other engine alone, shapes fixed.
        wanted += [{"quantize": "none", "target": t, **fixed} for t in compiling]
    if "freeze_inputs" in names:
        # Inputs the data holds constant folded away (silero-vad's If on its sample rate): OpenVINO refused the
        # unfolded graph ("unknown rank") and compiled the folded one, 1.8x.
        wanted += [{"quantize": "none", "target": t, "freeze_inputs": True, **fixed} for t in compiling]
    for mode in ("dynamic", "static"):
        if mode in modes and mode not in misses:
            wanted.append({"quantize": mode})
    if "static" in modes:
        if "static" not in misses:
            wanted.append({"quantize": "static", "static_ops": "compute"})
        if "keep_float_k" not in misses:
            wanted.append({"quantize": "static", "keep_float_k": STARTING_KEEP_FLOAT})
        # The fitted mixed precision on each compiling engine that keeps its float nodes fp32 (an engine's
        # bf16 default would cost the fidelity the fit kept), before the CPU EP's: OpenVINO f32 ran PP-OCRv4
        # det's fitted int8 (26 of 64 groups float, cosine 0.994) 3.0x faster than the original on the CPU EP
        # (its f32 alone 2.1x), and on a large model a small budget ends after a few such trials.
        if "keep_float_fit" not in misses:
            wanted += [
                {"quantize": "static", "keep_float_fit": True, "target": t, **fixed}
                for t in compiling
                if parse_target(t).full_precision
            ]
            wanted.append({"quantize": "static", "keep_float_fit": True})
    if "fuse_transformer" in names and "dynamic" in modes:
        wanted.append({"quantize": "dynamic", "fuse_transformer": True})
    if "prune_sparsity" in names:
        wanted.append({"quantize": "none", "prune_sparsity": 0.3})
    points = []
    for want in wanted:
        params = suggest(dims, functools.partial(_wanted_or_first, want))
        if all(params.get(k) == v for k, v in want.items()):
            points.append(params)
    return points


@dataclass
class Runner:
    """Builds, scores and times trials through an executor (in this process, or Ray tasks)."""

    settings: TuneSettings
    executor: Any
    on_progress: Callable[[Progress], None] = lambda _p: None
    log: Callable[[str], None] = lambda _m: None

    @property
    def original_bytes(self) -> int:
        from optimizer_cli.model_io import file_size

        return file_size(self.settings.model)

    def candidate_dir(self, number: int) -> Path:
        return self.settings.study_dir / "trials" / f"{number:04d}"

    def build_jobs(self, numbered: list[tuple[int, dict[str, Any]]]) -> list[BuildJob]:
        jobs = []
        for number, params in numbered:
            out = self.candidate_dir(number)
            out.mkdir(parents=True, exist_ok=True)
            jobs.append(
                BuildJob(
                    number,
                    str(self.settings.model),
                    recipe_for(params, self.settings.ctx),
                    str(out),
                    self.settings.ctx.calibration,
                    self.settings.data,
                    self.settings.ctx.threads,
                    candidate_target(params, self.settings.ctx),
                )
            )
        return jobs

    def time_jobs(self, built: list[dict[str, Any]], recipes: dict[int, dict[str, Any]], seconds: float) -> TimeJob:
        return TimeJob(
            numbers=[b["number"] for b in built],
            original=str(self.settings.model),
            candidates=[b["model_path"] for b in built],
            sessions=[recipes[b["number"]].get("session", {}) for b in built],
            data=self.settings.data,
            threads=self.settings.ctx.threads,
            targets=[(recipes[b["number"]].get("runtime") or {}).get("target") or REFERENCE for b in built],
            rounds=6,  # a search trial; the final timing sets its own
            max_seconds=seconds,
        )

    def run_batch(self, numbered: list[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Records of a batch of new trials: built and scored (in parallel where the executor can), then the
        ones meeting the fidelity goals timed one at a time on reserved cores."""
        jobs = self.build_jobs(numbered)
        recipes = {j.number: j.recipe for j in jobs}
        results = self.executor.map(build_and_score, jobs, num_cpus=1)
        records = []
        to_time = []
        for (number, params), result in zip(numbered, results, strict=True):
            record = _record(number, params, result, recipes[number], self.settings, self.original_bytes)
            records.append(record)
            if record["state"] == "built" and record["goals_met"]:
                to_time.append((record, result))
            elif record["state"] != "built":
                shutil.rmtree(self.candidate_dir(number), ignore_errors=True)  # keep only candidates worth keeping
        if to_time:
            timing = self.executor.map(
                time_candidates,
                [self.time_jobs([r], recipes, self.settings.trial_seconds) for _rec, r in to_time],
                num_cpus=self.settings.ctx.threads,
            )
            for (record, _r), timed in zip(to_time, timing, strict=True):
                _add_timing(record, timed)
        for record in records:
            if record["state"] == "built":  # met nothing more to do: rejected
                record["state"] = "rejected"
                shutil.rmtree(self.candidate_dir(record["number"]), ignore_errors=True)
        return records


def _record(
    number: int,
    params: dict[str, Any],
    result: Any,
    recipe: dict[str, Any],
    settings: TuneSettings,
    original_bytes: int,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "number": number,
        "params": params,
        "recipe_summary": summary(params, settings.ctx),
        "recipe": recipe,
        "state": "failed",
        "reason": None,
        "fidelity": None,
        "goals_met": None,
        "speedup": None,
        "p50_ms": None,
        "size_ratio": None,
        "build_s": None,
        "time_s": None,
        "stages": [],
    }
    if not isinstance(result, dict):  # the executor's TaskError: the task itself died
        record["reason"] = getattr(result, "message", str(result))
        return record
    record["build_s"] = round(float(result.get("build_s", 0.0)), 2)
    if result["state"] != "built":
        record["reason"] = result["reason"]
        return record
    row = result["row"]
    fid, acc_b = row["fidelity"], row["accuracy_optimized"]
    record.update(
        state="built",
        model_path=result["model_path"],
        bytes=result["bytes"],
        row=row,
        stages=result["stages"],
        fidelity={
            "cosine": fid["cosine_min"],
            "cosine_mean": fid["cosine_mean"],
            "top1_agreement": fid["top1_agreement"],
            "nonfinite": fid["nonfinite"],
            "accuracy": acc_b["top1"] if acc_b else None,
            "accuracy_drop": metric_value("accuracy_drop", row),
        },
    )
    record["size_ratio"] = result["bytes"] / original_bytes
    misses = check_goals(fidelity_goals(settings.goals), row, (original_bytes, result["bytes"]))
    record["goals_met"] = not misses
    if misses:
        record["reason"] = "; ".join(misses) + " (not timed)"
    return record


def _add_timing(record: dict[str, Any], timed: Any) -> None:
    if not isinstance(timed, dict) or timed.get("state") != "timed":
        record["state"] = "failed"
        record["reason"] = timed.get("reason") if isinstance(timed, dict) else getattr(timed, "message", str(timed))
        return
    result = timed["results"][0]
    record.update(state="timed", speedup=result["speedup"], p50_ms=result["p50_ms"], time_s=round(timed["time_s"], 2))
    record["original_p50_ms"] = timed["original_p50_ms"]
    record["row"]["speedup"] = result["speedup"]


def _tell(study: Any, trial: Any, record: dict[str, Any]) -> None:
    trial.set_user_attr("record", record)  # the whole record: a resumed study re-times from it
    _tell_outcome(study, trial, record)


def _tell_outcome(study: Any, trial: Any, record: dict[str, Any]) -> None:
    """The sampler's view of a trial's (or, for a repeat, the first trial's) outcome."""
    if record["state"] == "timed":
        trial.set_constraint("goals", 0.0)
        study.tell(trial, [record["speedup"]["median"], record["fidelity"]["cosine"]])
    elif record["state"] == "rejected":
        # Never timed: the sampler ranks it below every feasible trial (constraint), whatever its values say.
        trial.set_constraint("goals", 1.0)
        study.tell(trial, [0.0, float(record["fidelity"]["cosine"])])
    else:
        _tell_failed(study, trial)


def _tell_failed(study: Any, trial: Any) -> None:
    """A candidate that could not be built (a quantizer refusing this model's graph): infeasible and worst on
    both objectives, so the sampler learns to stay away instead of proposing it again (a FAIL state it ignores)."""
    trial.set_constraint("goals", 2.0)
    study.tell(trial, [0.0, -1.0])


def _best(records: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    timed = [r for r in records.values() if r["state"] == "timed"]
    return max(timed, key=lambda r: r["speedup"]["median"]) if timed else None


def search(runner: Runner, study: Any, state: TuneState) -> str:
    """Trials until the budget, the trial count or the space runs out; returns why it stopped."""
    settings = runner.settings
    start = time.perf_counter()
    deadline = None if settings.budget_s is None else start + max(0.0, settings.budget_s - state.elapsed_before)
    if not state.records:
        for point in starting_points(settings.dims, settings.ctx, cosine_floor(fidelity_goals(settings.goals))):
            study.enqueue_trial(point)  # (repeats are caught by our own de-duplication)
    repeats = 0
    batch_seconds: list[float] = []  # wall time of each batch of new trials, to foresee the next one's
    while True:
        done = len(state.records)
        if settings.trials is not None and done >= settings.trials:
            return f"{done} trials done"
        if deadline is not None and time.perf_counter() >= deadline:
            return "time budget spent"
        if deadline is not None and batch_seconds and time.perf_counter() + _expected(batch_seconds) > deadline:
            # A trial started now would end past the budget (a large model's int8 trial can take minutes):
            # the budget is the search's wall time, not the time before the last trial starts.
            return "time budget spent (the next trial would end past it)"
        if repeats >= EXHAUSTED_AFTER:
            return "the space is exhausted (every proposal had been tried)"
        width = runner.executor.parallelism
        if settings.trials is not None:
            width = min(width, settings.trials - done)
        batch = _propose(study, settings, width, explore=repeats > 0)
        new: list[tuple[Any, dict[str, Any]]] = []
        repeated: list[tuple[Any, dict[str, Any]]] = []
        for trial, params in batch:  # proposals already tried, before or in this batch, are not rebuilt
            tried = _key(params) in state.by_params or any(_key(p) == _key(params) for _t, p in new)
            (repeated if tried else new).append((trial, params))
        if new:
            repeats = 0
            batch_start = time.perf_counter()
            records = runner.run_batch([(t.number, p) for t, p in new])
            batch_seconds.append(time.perf_counter() - batch_start)
            for (trial, params), record in zip(new, records, strict=True):
                _tell(study, trial, record)
                state.records[trial.number] = record
                state.by_params[_key(params)] = trial.number
                if record.get("original_p50_ms") is not None:
                    state.original_p50_ms = record["original_p50_ms"]
            elapsed = state.elapsed_before + time.perf_counter() - start
            _write_config(settings, elapsed, {"original_p50_ms": state.original_p50_ms})
            left = None if deadline is None else max(0.0, deadline - time.perf_counter())
            runner.on_progress(Progress(len(state.records), settings.trials, left, records[-1], _best(state.records)))
        for trial, params in repeated:
            repeats += 1
            _tell_duplicate(study, trial, params, state)


def _expected(seconds: list[float]) -> float:
    """The next batch's expected wall time: the median of the batches so far (trials differ: an engine alone
    takes seconds, int8 calibration on a large input minutes)."""
    return statistics.median(seconds)


def _propose(study: Any, settings: TuneSettings, width: int, explore: bool = False) -> list[tuple[Any, dict[str, Any]]]:
    """The next proposals; after a repeated one (TPE converging on what it has tried) a random one, so the
    budget goes to candidates not yet built."""
    import optuna

    batch = []
    told = sum(1 for t in study.get_trials(deepcopy=False) if "record" in t.user_attrs)
    for i in range(max(1, width)):
        # Seeded by the trials told so far (not by trials an interruption left failed): reproducible on resume.
        seed = settings.seed + told + i
        study.sampler = optuna.samplers.RandomSampler(seed=seed) if explore else _sampler(settings, told + i)
        trial = study.ask()
        params = suggest(settings.dims, functools.partial(_suggest_with, trial))
        batch.append((trial, params))
    return batch


def _tell_duplicate(study: Any, trial: Any, params: dict[str, Any], state: TuneState) -> None:
    """A proposal already tried: told the same outcome, not rebuilt (and not counted as a new trial)."""
    first = state.records[state.by_params[_key(params)]]
    record = {
        "number": trial.number,
        "state": "duplicate",
        "params": params,
        "reason": f"same as trial {first['number']}",
    }
    trial.set_user_attr("record", record)
    state.duplicates[trial.number] = record
    _tell_outcome(study, trial, first)


# --- the honest winner ------------------------------------------------------------------------------


def pareto(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Timed records no other timed record beats on both speedup and cosine."""
    front = []
    for r in records:
        s, c = r["speedup"]["median"], r["fidelity"]["cosine"]
        if not any(
            o is not r
            and o["speedup"]["median"] >= s
            and o["fidelity"]["cosine"] >= c
            and (o["speedup"]["median"] > s or o["fidelity"]["cosine"] > c)
            for o in records
        ):
            front.append(r)
    return front


def _family(record: dict[str, Any]) -> tuple[Any, ...]:
    """What kind of model a candidate is: its variants (per-channel, k float, session options) time alike."""
    p = record["params"]
    return (
        p.get("target"),  # each engine's fastest reaches the final, timed together with the others
        p.get("quantize"),
        bool(p.get("prune_sparsity")),
        bool(p.get("factorize_energy")),
        bool(p.get("trim_padding")),
    )


def finalists(records: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """The fastest candidate of each family (so one kind of model, flattered by noise in the search, cannot
    crowd out the others), then the Pareto front's fastest, up to FINALISTS."""
    timed = sorted((r for r in records.values() if r["state"] == "timed"), key=lambda r: -r["speedup"]["median"])
    chosen: list[dict[str, Any]] = []
    families: set[tuple[Any, ...]] = set()
    for r in timed:
        if _family(r) not in families:
            families.add(_family(r))
            chosen.append(r)
    front = [r for r in pareto(timed) if r not in chosen]
    rest = [r for r in timed if r not in chosen and r not in front]
    picked = (chosen + sorted(front, key=lambda r: -r["speedup"]["median"]) + rest)[:FINALISTS]
    return sorted(picked, key=lambda r: -r["speedup"]["median"])


def final_check(runner: Runner, state: TuneState) -> dict[str, Any]:
    """Re-time the finalists together with the original and pick the winner (or say why there is none)."""
    chosen = finalists(state.records)
    if not chosen:
        return {"candidates": [], "winner": None, "verdict": "none", "reason": _none_reason(state)}
    runner.log(f"re-timing {len(chosen)} finalist(s) together with the original")
    timed = _time_finalists(runner, chosen, FINAL_ROUNDS, runner.settings.final_seconds)
    if timed.get("state") != "timed":
        return {
            "candidates": [],
            "winner": None,
            "verdict": "none",
            "reason": f"the final timing failed: {timed['reason']}",
        }
    hopeful = [r for r, res in zip(chosen, timed["results"], strict=True) if res["speedup"]["median"] > 1.0]
    if hopeful and not any(res["speedup"]["ci_low"] > 1.0 for res in timed["results"]):
        # Inconclusive (faster medians, intervals reaching 1): more rounds for those alone, once, before saying no.
        runner.log(f"inconclusive: re-timing {len(hopeful)} finalist(s) with {EXTEND}x the rounds")
        again = _time_finalists(runner, hopeful, FINAL_ROUNDS * EXTEND, runner.settings.final_seconds * EXTEND)
        if again.get("state") == "timed":
            chosen, timed = hopeful, again
    candidates = []
    for record, result in zip(chosen, timed["results"], strict=True):
        row = dict(record.get("row") or {}, speedup=result["speedup"], latency_optimized={"p50_ms": result["p50_ms"]})
        misses = check_goals(runner.settings.goals, row, (runner.original_bytes, record["bytes"]))
        if result["speedup"]["ci_low"] <= 1.0:
            misses.append(
                f"speedup {result['speedup']['median']:.3g}x: its 95% interval reaches down to {result['speedup']['ci_low']:.3g}"
            )
        candidates.append(
            {
                "number": record["number"],
                "recipe_summary": record["recipe_summary"],
                "speedup": result["speedup"],
                "p50_ms": result["p50_ms"],
                "fidelity": record["fidelity"],
                "meets_goals": not misses,
                "misses": misses,
            }
        )
    qualified = [c for c in candidates if c["meets_goals"]]
    state.original_p50_ms = timed["original_p50_ms"]
    if not qualified:
        return {
            "candidates": candidates,
            "winner": None,
            "verdict": "none",
            "original_p50_ms": timed["original_p50_ms"],
            "reason": "no candidate meets every goal with a speedup whose 95% interval lies above 1 on the final timing",
        }
    rounds = {res["number"]: res.get("round_p50_ms") for res in timed["results"]}
    winner, tie = pick_winner(qualified, {r["number"]: r["params"] for r in chosen}, rounds)
    return {
        "candidates": candidates,
        "winner": winner["number"],
        "verdict": "found",
        "original_p50_ms": timed["original_p50_ms"],
        "reason": "fastest candidate meeting every goal whose speedup's 95% interval lies above 1 (final timing, "
        f"{timed['rounds']} interleaved rounds with the original)" + tie,
    }


# The engine's settings at the recipe's defaults (the passes declare their own: `search_knob_defaults`).
ENGINE_DEFAULTS = {"opt_level": "all", "execution_mode": "sequential", "mem_pattern": True, "threads": None}


def extra_pass_params() -> tuple[str, ...]:
    """Trial parameters that add a pass to the plain recipe, as the registered passes declare them (their
    `search_switches`): each is one more thing to trust and to keep in a deployment."""
    return tuple(param for cls in PASS_REGISTRY.values() for param in cls.search_switches)


def complexity(params: dict[str, Any]) -> tuple[int, int, int]:
    """How far a candidate departs from the plain recipe: nodes kept float, then passes added, then knobs off
    their defaults."""
    defaults = dict(ENGINE_DEFAULTS)
    for cls in PASS_REGISTRY.values():
        defaults |= cls.search_knob_defaults
    changed = sum(1 for k, v in defaults.items() if k in params and params[k] != v)
    # Another engine is one more thing to deploy: when the timing cannot tell it apart, the CPU EP wins.
    changed += params.get("target", REFERENCE) != REFERENCE
    # A float set fitted to the goal counts as the largest k: it is the most nodes mixed precision keeps.
    kept = 64 if params.get("keep_float_fit") else int(params.get("keep_float_k") or 0)
    passes = sum(1 for k in extra_pass_params() if params.get(k))
    return kept, passes, changed


def pick_winner(
    qualified: list[dict[str, Any]],
    params: dict[int, dict[str, Any]],
    rounds: dict[int, list[float] | None] | None = None,
) -> tuple[dict[str, Any], str]:
    """The fastest; but among the candidates the fastest one's 95% interval cannot tell apart from it, the
    simplest (fewest nodes kept float, fewest passes added, fewest knobs changed): a tie is noise, and the simpler
    model is the one that times the same elsewhere. `rounds` (each candidate's per-round p50 in the final timing,
    where they took turns in the same rounds) sharpens "cannot tell apart": a candidate that, paired round by
    round with the fastest, is slower with 95% confidence is no tie, however wide the intervals against the
    original are (on a 1-2 ms model they overlap for candidates 20% apart)."""
    rounds = rounds or {}
    fastest = max(qualified, key=lambda c: c["speedup"]["median"])
    within = [c for c in qualified if c["speedup"]["median"] >= fastest["speedup"]["ci_low"]]
    slower = {c["number"]: _paired_slowdown(rounds, c["number"], fastest["number"]) for c in within}
    tied = [c for c in within if not _surely_slower(slower[c["number"]])]

    def simplest_of(group: list[dict[str, Any]]) -> dict[str, Any]:
        return min(group, key=lambda c: (complexity(params[c["number"]]), -c["speedup"]["median"]))

    simplest = simplest_of(tied)
    passed_over = simplest_of(within)
    paired = ""
    if passed_over is not simplest:
        ratio, low, high = slower[passed_over["number"]] or (0.0, 0.0, 0.0)
        paired = (
            f"; trial {passed_over['number']} ({passed_over['speedup']['median']:.2f}x) is within the 95% interval "
            f"of the fastest, trial {fastest['number']} ({fastest['speedup']['median']:.2f}x), and simpler, but "
            f"paired round by round with it, it takes {ratio:.2f}x as long [{low:.2f}, {high:.2f}]"
        )
    if simplest is fastest:
        return fastest, paired
    return simplest, (
        f"; trial {simplest['number']} ({simplest['speedup']['median']:.2f}x) is within the 95% interval of the "
        f"fastest, trial {fastest['number']} ({fastest['speedup']['median']:.2f}x), and simpler" + paired
    )


def _surely_slower(paired: tuple[float, float, float] | None) -> bool:
    """Whether a paired slowdown's 95% interval lies above 1."""
    return paired is not None and paired[1] > 1.0


def _paired_slowdown(
    rounds: dict[int, list[float] | None], number: int, fastest: int
) -> tuple[float, float, float] | None:
    """How many times as long `number` took as `fastest` in the same rounds: median and 95% bootstrap interval
    of the per-round ratios; None without round data for both (or too few rounds to bootstrap)."""
    from optimizer_cli.bench.latency import bootstrap_ratio

    mine, theirs = rounds.get(number), rounds.get(fastest)
    if number == fastest or not mine or not theirs or len(mine) != len(theirs) or len(mine) < 3:
        return None
    return bootstrap_ratio(mine, theirs)  # type: ignore[arg-type]


def _time_finalists(runner: Runner, chosen: list[dict[str, Any]], rounds: int, seconds: float) -> dict[str, Any]:
    built = [{"number": r["number"], "model_path": r["model_path"]} for r in chosen]
    job = runner.time_jobs(built, {r["number"]: r["recipe"] for r in chosen}, seconds)
    job.rounds = rounds
    timed = runner.executor.map(time_candidates, [job], num_cpus=runner.settings.ctx.threads)[0]
    if not isinstance(timed, dict):
        return {"state": "failed", "reason": getattr(timed, "message", str(timed))}
    return timed


def _none_reason(state: TuneState) -> str:
    counts: dict[str, int] = {}
    for r in state.records.values():
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    seen = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no trials"
    return f"no candidate met the fidelity goals ({seen})"


def closest(records: dict[int, dict[str, Any]], n: int = 3) -> list[dict[str, Any]]:
    """The candidates nearest the goals when none met them: best worst-output cosine first."""
    scored = [r for r in records.values() if r["state"] in ("rejected", "timed") and r["fidelity"]]
    scored.sort(key=lambda r: -float(r["fidelity"]["cosine"]))
    return [
        {"number": r["number"], "recipe_summary": r["recipe_summary"], "fidelity": r["fidelity"], "reason": r["reason"]}
        for r in scored[:n]
    ]


# --- set-up and the whole run -----------------------------------------------------------------------


def _feed_digest(feed: dict[str, Any]) -> str:
    import hashlib

    h = hashlib.sha1()
    for name in sorted(feed):
        array = feed[name]
        h.update(name.encode())
        h.update(str(array.dtype).encode() + str(array.shape).encode())
        h.update(array.tobytes())
    return h.hexdigest()


def check_held_out(calibration: Any, evaluation: Any, source: str) -> None:
    """Fidelity must be read on data the candidates were not calibrated, pruned or refitted on."""
    if calibration is None:
        return
    seen = {_feed_digest(f) for f in calibration.feeds}
    shared = sum(1 for f in evaluation.feeds if _feed_digest(f) in seen)
    if shared:
        raise UserInputError(
            f"{shared} of {len(evaluation)} evaluation samples also appear in the calibration data: tune needs "
            "held-out evaluation data (split your data into --calib and --data)",
            source,
        )


def cosine_floor(goals: list[Gate]) -> float:
    """The strictest cosine goal, else 0.99."""
    return max([g.threshold for g in goals if g.metric == "cosine" and g.op in (">=", ">")], default=0.99)


def fit_target(goals: list[Gate]) -> float:
    """The simulated cosine keep_float_fit aims at: the strictest cosine goal plus a quarter of its headroom
    (the simulation is fitted on calibration data; the goal is judged on held-out data)."""
    from optimizer_cli.search.sensitivity import with_headroom

    return with_headroom(cosine_floor(goals))


def _rank_static(
    pre: Any, post: Any, ctx: RecipeContext, target: float, log: Callable[[str], None]
) -> tuple[list[list[str]], int | None, float]:
    """Groups by the output cosine each costs quantized alone (fake-quant simulation on calibration data),
    how many of them the target needs float, and the simulated cosine with all of them quantized."""
    from optimizer_cli.data import load_dataset
    from optimizer_cli.search.sensitivity import output_sensitivity

    assert ctx.calibration is not None
    feeds = load_dataset(ctx.calibration, pre.model, limit=8).feeds
    result = output_sensitivity(post.model, pre.model, feeds, target, ctx.threads)
    fitted = "none" if result.keep_float is None else f"{result.keep_float} of {len(result.ranked)} groups"
    log(f"  output sensitivity: float groups the goal needs (cosine {target:.4f} simulated): {fitted}")
    return result.ranked, result.keep_float, result.all_quantized


def rank_for_mixed_precision(
    model: Path,
    modes: list[str],
    ctx: RecipeContext,
    eval_feeds: list[dict[str, Any]],
    log: Callable[[str], None],
    target: float = 0.99,
) -> tuple[dict[str, list[list[str]]], dict[str, int], dict[str, float]]:
    """Per quantize mode: node groups worst first, so keep_float_k = k keeps the first k groups in float, and
    (static) how many the fidelity target needs and the simulated cosine of the model all in int8. Static
    ranks by output sensitivity (search/sensitivity.py); dynamic by local attribution on the evaluation data,
    and static falls back to it when the simulation cannot be built."""
    from optimizer_cli.pipeline import run_pipeline
    from optimizer_cli.recipe import Recipe
    from optimizer_cli.search.attribution import rank_nodes

    ranked: dict[str, list[list[str]]] = {}
    fitted: dict[str, int] = {}
    simulated: dict[str, float] = {}
    for mode in modes:
        log(f"ranking nodes by the fidelity {mode} int8 costs them (mixed precision)")
        full = recipe_for({"quantize": mode}, ctx)
        before = {**full, "passes": full["passes"][:-1]}
        try:
            pre = run_pipeline(
                model, Recipe.model_validate(before), None, calibration=ctx.calibration, threads=ctx.threads
            )
            post = run_pipeline(
                model, Recipe.model_validate(full), None, calibration=ctx.calibration, threads=ctx.threads
            )
        except Exception as exc:  # the mode fails outright on this model: its trials will say why
            log(f"  no ranking for {mode}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        if mode == "static" and ctx.calibration:
            try:
                ranked[mode], keep, simulated[mode] = _rank_static(pre, post, ctx, target, log)
                if keep is not None:
                    fitted[mode] = keep
                continue
            except Exception as exc:  # an op layout the simulation does not know: local attribution instead
                log(f"  no output sensitivity ({type(exc).__name__}: {str(exc)[:160]}); ranking by attribution")
        entries = rank_nodes(pre.model, post.model, eval_feeds[:8], ctx.threads)
        ranked[mode] = [e["nodes"] for e in entries if float(e["local_drop"]) > 0]
    return ranked, fitted, simulated


def winner_attribution(
    model: Path, winner_path: Path, feeds: list[dict[str, Any]], threads: int
) -> list[dict[str, Any]]:
    """Where the winner loses what fidelity it loses: nodes of the original by local cosine drop."""
    from optimizer_cli.model_io import load_model
    from optimizer_cli.pipeline import normalize
    from optimizer_cli.search.attribution import rank_nodes

    original = load_model(model)
    normalize(original)
    try:
        ranked = rank_nodes(original, load_model(winner_path), feeds[:8], threads)
    except Exception:  # attribution is a help, not a verdict: a graph it cannot compare gets none
        return []
    return [
        {"node": e["node"], "op": e["op"], "cosine": float(e["cosine"]), "local_drop": float(e["local_drop"])}
        for e in ranked[:15]
        if float(e["local_drop"]) > 0
    ]


def trial_entry(record: dict[str, Any]) -> dict[str, Any]:
    """A trial as tune.json lists it."""
    keys = (
        "number",
        "params",
        "state",
        "reason",
        "recipe_summary",
        "fidelity",
        "goals_met",
        "speedup",
        "p50_ms",
        "size_ratio",
        "build_s",
        "time_s",
        "stages",
    )
    return {k: record.get(k) for k in keys}


def with_final_timing(entries: list[dict[str, Any]], final: dict[str, Any]) -> list[dict[str, Any]]:
    """One speed per candidate: a trial re-timed in the final round reports that timing (the one the verdict and
    headline read), marked timing "final", its search-time figures kept beside it; other timed trials "search"."""
    finals = {c["number"]: c for c in final.get("candidates") or []}
    for entry in entries:
        if entry["number"] in finals:
            chosen = finals[entry["number"]]
            entry.update(
                search_speedup=entry["speedup"],
                search_p50_ms=entry["p50_ms"],
                speedup=chosen["speedup"],
                p50_ms=chosen["p50_ms"],
                timing="final",
            )
        else:
            entry["timing"] = "search" if entry.get("speedup") is not None else None
    return entries


def deployment(record: dict[str, Any], settings: TuneSettings, model_path: str = "best.onnx") -> dict[str, Any]:
    """How to run the winner as it was measured: its target (provider, device, precision, options), the session
    options of its recipe, and the Python that creates that session."""
    from optimizer_cli.runtime.targets import deployment_snippet, parse_target

    target = parse_target(candidate_target(record["params"], settings.ctx))
    session = record["recipe"].get("session") or {}
    return {
        **target.as_dict(),
        "session": session,
        "threads": session.get("threads") or settings.ctx.threads,  # the recipe's own count, where it has one
        "python": deployment_snippet(target, model_path, settings.ctx.threads, session),
    }


def result_document(
    settings: TuneSettings, state: TuneState, final: dict[str, Any], stopped: str, elapsed: float
) -> dict[str, Any]:
    from optimizer_cli.bench.environment import environment
    from optimizer_cli.model_io import file_size

    winner_number = final.get("winner")
    winner = None
    if winner_number is not None:
        record = state.records[winner_number]
        chosen = next(c for c in final["candidates"] if c["number"] == winner_number)
        winner = {
            "number": winner_number,
            "recipe_summary": record["recipe_summary"],
            "params": record["params"],
            "recipe": record["recipe"],
            "speedup": chosen["speedup"],
            "p50_ms": chosen["p50_ms"],
            "fidelity": record["fidelity"],
            "size_ratio": record["size_ratio"],
            "attribution": final.get("attribution", []),
            "deploy": deployment(record, settings),
        }
    if winner is None and not final.get("candidates"):
        final = {**final, "closest": closest(state.records)}
    told = {**state.records, **state.duplicates}  # every trial number, repeats included
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "tune",
        "model": str(settings.model),
        "model_sha256": settings.model_sha256,
        "goals": [g.expression for g in settings.goals],
        "notes": settings.notes,
        "evaluation": settings.data.evaluation,
        "evaluation_samples": settings.data.samples,
        "providers": list(settings.targets),
        "threads": settings.ctx.threads,
        "budget": {"seconds": settings.budget_s, "trials": settings.trials},
        "elapsed_s": round(elapsed, 1),
        "stopped": stopped,
        "sampler": settings.sampler,
        "study": str(settings.study_dir),
        "space": describe(settings.dims),
        "original": {"bytes": file_size(settings.model), "p50_ms": final.get("original_p50_ms", state.original_p50_ms)},
        "trials": with_final_timing([trial_entry(told[n]) for n in sorted(told)], final),
        "final": {k: v for k, v in final.items() if k != "attribution"},
        "winner": winner,
        "environment": environment(),
    }


@dataclass
class TuneRequest:
    """Everything `optimize tune` was asked, checked by the CLI before any work."""

    model: Path
    goals: list[Gate]
    evaluation: str
    calibration: str | None
    study_dir: Path
    # The run targets to consider (validated and usable, checked by the caller); more than one, or one other
    # than the CPU EP, makes `target` a dimension of the space.
    targets: tuple[str, ...] = (REFERENCE,)
    threads: int = 2
    budget_s: float | None = None
    trials: int | None = None
    resume: bool = False
    sampler: str = "tpe"
    seed: int = 0
    space_file: Path | None = None
    dims: dict[str, int] = field(default_factory=dict)
    eval_samples: int | None = None  # all of them: fewer make per-sample goals coarser than they read
    calib_samples: int = 64
    metric: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # the recipe metrics section (kinds, charset, ...)
    scratch: bool = False  # study_dir is a folder this run created for itself (no --study): removed after it


def portable_data(spec: str | None) -> str | None:
    """A data spec that names the same data from any folder: paths (and a loader's .py file) made absolute, so
    the winner's recipe and its "Reproduce" command work wherever they are run. 'random' and module:function
    loaders name no file and stay as they are."""
    from optimizer_cli.data import is_loader_spec

    if spec is None or spec == "random":
        return spec
    if is_loader_spec(spec):
        target, _, func = spec.rpartition(":")
        return f"{Path(target).resolve()}:{func}" if target.endswith(".py") else spec
    return str(Path(spec).resolve())


def reproduce_command(
    model: str, recipe: Path, calibration: str | None, evaluation: str | None = None, samples: int | None = None
) -> str:
    """The command that rebuilds the winner from its recipe and scores it on tune's evaluation data (the same
    samples, so it reads tune's figures), with absolute paths: it works from any folder."""
    from optimizer_cli.data import is_loader_spec

    loaders = [s for s in (calibration, evaluation) if s is not None and is_loader_spec(s)]
    command = f"optimize {_quoted(Path(model).resolve())} --recipe {_quoted(recipe.resolve())} -o OUT.onnx"
    if evaluation is not None:
        command += f" --data {shlex.quote(portable_data(evaluation) or evaluation)}"
        command += f" --eval-samples {samples}" if samples else ""
    return command + (" --allow-code" if loaders else "")


def _quoted(path: Path) -> str:
    return shlex.quote(str(path))


def prepare(request: TuneRequest, log: Callable[[str], None]) -> TuneSettings:
    """Load and check the model and data, derive the space, and make the settings of the study."""
    from optimizer_cli.data import load_dataset, resolve_dataset, shape_mix
    from optimizer_cli.model_io import load_model, model_sha256
    from optimizer_cli.passes.freeze_inputs import config_inputs
    from optimizer_cli.pipeline import check_input_model, normalize
    from optimizer_cli.runtime.cpu import u8s8_saturates
    from optimizer_cli.search.space import default_space, limit_space, load_space_file, model_traits

    model = load_model(request.model)
    normalize(model)
    check_input_model(model, request.model)
    calib = None
    if request.calibration is not None:
        calib = resolve_dataset(
            request.calibration,
            model,
            samples=request.calib_samples,
            seed=1,
            dims=request.dims,
            limit=request.calib_samples,
        )
    evaluation = load_dataset(request.evaluation, model, limit=request.eval_samples)
    notes = resolution_notes(request.goals, len(evaluation))
    for note in notes:
        log(f"note: {note}")
    check_held_out(calib, evaluation, request.evaluation)
    traits = model_traits(
        model,
        has_calibration=calib is not None,
        mixed_calibration_shapes=calib is not None and len(shape_mix(calib.feeds)) > 1,
        gpu=any(parse_target(target).ep_name in GPU_PROVIDERS for target in request.targets),
        saturating_cpu=u8s8_saturates(),
        one_evaluation_shape=len(shape_mix(evaluation.feeds)) == 1,  # the shape static_shapes would fix
        constant_config_inputs=tuple(config_inputs(model, evaluation)[0]),  # what freeze_inputs would freeze
    )
    dims = default_space(traits)
    if request.targets != (REFERENCE,):
        dims.insert(0, Dimension("target", tuple(request.targets), "where the model runs (provider, precision)"))
    if request.threads > 1:
        dims.append(fewer_threads_dimension())
    if request.space_file is not None:
        dims = limit_space(dims, load_space_file(request.space_file), request.space_file)
    metrics = request.metrics
    ctx = RecipeContext(
        request.calibration, dict(request.dims), request.threads, REFERENCE, traits.depthwise_nodes, {}, metrics
    )
    data = DataRef(
        str(request.model),
        request.evaluation,
        len(evaluation),
        request.metric,
        metrics.get("charset"),
        float(metrics.get("map_threshold", 0.3)),
        dict(metrics.get("outputs", {})),
    )
    return TuneSettings(
        model=request.model,
        goals=request.goals,
        ctx=ctx,
        data=data,
        dims=dims,
        study_dir=request.study_dir,
        budget_s=request.budget_s,
        trials=request.trials,
        sampler=request.sampler,
        seed=request.seed,
        resume=request.resume,
        model_sha256=model_sha256(request.model),
        notes=notes,
    )


def check_goals_measurable(settings: TuneSettings) -> None:
    """The original against itself: a goal it cannot measure (accuracy without labels) fails now, not after
    the search."""
    from optimizer_cli.model_io import file_size
    from optimizer_cli.search.candidates import quality_row

    row = quality_row(settings.data, settings.ctx.threads, REFERENCE, settings.model, None)
    size = file_size(settings.model)
    check_goals(fidelity_goals(settings.goals), row, (size, size))


def _ranking(settings: TuneSettings, log: Callable[[str], None]) -> None:
    """Mixed precision needs the nodes ranked once per study (saved with it: a resumed study uses the same)."""
    if not any(d.name in ("keep_float_k", "keep_float_fit") for d in settings.dims):
        return
    path = settings.study_dir / "ranking.json"
    if path.exists():
        saved = read_json(path, "ranking.json", ("ranked", "fitted"))
        saved.setdefault("simulated", {})  # (studies before it was saved lack it)
        wrong = [k for k in ("ranked", "fitted", "simulated") if not isinstance(saved[k], dict)]
        if wrong:
            raise UserInputError(f"the study's ranking.json is corrupted ({' and '.join(wrong)} must be objects)", path)
        ctx = settings.ctx
        ctx.ranked_nodes, ctx.fitted_keep, ctx.simulated_int8 = saved["ranked"], saved["fitted"], saved["simulated"]
        return
    from optimizer_cli.search.candidates import evaluation_data

    modes = [m for m in ("dynamic", "static") if any(d.name == "quantize" and m in d.choices for d in settings.dims)]
    feeds = evaluation_data(settings.data).feeds
    ctx = settings.ctx
    ctx.ranked_nodes, ctx.fitted_keep, ctx.simulated_int8 = rank_for_mixed_precision(
        settings.model, modes, ctx, feeds, log, fit_target(fidelity_goals(settings.goals))
    )
    path.write_text(
        json.dumps({"ranked": ctx.ranked_nodes, "fitted": ctx.fitted_keep, "simulated": ctx.simulated_int8})
    )


def run_tune(
    settings: TuneSettings,
    executor: Any,
    *,
    on_progress: Callable[[Progress], None] = lambda _p: None,
    log: Callable[[str], None] = lambda _m: None,
) -> tuple[dict[str, Any], Path | None]:
    """The search, then the final re-timing; returns tune.json's document and the winner's model file."""
    from optimizer_cli.search.candidates import evaluation_data

    start = time.perf_counter()
    check_goals_measurable(settings)
    study = open_study(settings)
    state = restore(study, settings) if settings.resume else TuneState()
    _ranking(settings, log)
    runner = Runner(settings, executor, on_progress, log)
    stopped = search(runner, study, state)
    final = final_check(runner, state)
    winner_path = None
    if final["winner"] is not None:
        winner_path = Path(state.records[final["winner"]]["model_path"])
        final["attribution"] = winner_attribution(
            settings.model, winner_path, evaluation_data(settings.data).feeds, settings.ctx.threads
        )
    (settings.study_dir / "final.json").write_text(json.dumps({"final": final, "stopped": stopped}, default=str))
    elapsed = state.elapsed_before + time.perf_counter() - start
    return result_document(settings, state, final, stopped, elapsed), winner_path


def report_again(settings: TuneSettings) -> tuple[dict[str, Any], Path | None]:
    """A finished study's document from its folder, without running or timing anything."""
    settings.resume = True
    settings.report_only = True
    study = open_study(settings)  # first: a folder that is not a study is said so, whatever files it has
    path = settings.study_dir / "final.json"
    if not path.exists():
        raise UserInputError(
            "--report-only: this study has not finished (no final.json); resume it with --resume", settings.study_dir
        )
    state = restore(study, settings, write=False)
    saved = read_json(path, "final.json", ("final", "stopped"))
    final = saved["final"]
    if not isinstance(final, dict) or not isinstance(final.get("candidates", []), list):
        raise UserInputError("the study's final.json is corrupted (final is not a tune result)", path)
    number = final.get("winner")
    candidate_keys = ("number", "recipe_summary", "speedup", "p50_ms", "fidelity", "meets_goals", "misses")
    if any(not isinstance(c, dict) or any(k not in c for k in candidate_keys) for c in final.get("candidates", [])):
        raise UserInputError("the study's final.json is corrupted (a final candidate lacks its timing)", path)
    if number is not None and not any(c["number"] == number for c in final.get("candidates", [])):
        raise UserInputError(f"the study's final.json names winner {number!r} among no final candidates", path)
    if number is not None and number not in state.records:
        raise UserInputError(f"the study's final.json names winner {number!r}, a trial the journal lacks", path)
    winner_path = Path(state.records[number]["model_path"]) if number is not None else None
    return result_document(settings, state, final, str(saved["stopped"]), state.elapsed_before), winner_path
