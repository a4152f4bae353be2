"""tune's --budget is the search's wall time: a trial that would end past it is not started."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna

from optimizer_cli.search.space import Dimension
from optimizer_cli.search.tune import TuneState, search


def _runner(tmp_path: Path, budget_s: float, trial_s: float) -> SimpleNamespace:
    settings = SimpleNamespace(
        budget_s=budget_s,
        trials=None,
        dims=[Dimension("prune_sparsity", (0.0, 0.1, 0.2, 0.3, 0.4, 0.5), "sparsity")],
        seed=0,
        sampler="tpe",
        study_dir=tmp_path,
        identity=lambda: {},
        ctx=None,  # no mixed-precision ranking: every starting point is tried
        goals=[],
    )

    def run_batch(batch: list[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
        time.sleep(trial_s)  # a slow trial (a large model's int8 calibration)
        return [{"state": "failed", "reason": "test", "params": p, "number": n} for n, p in batch]

    return SimpleNamespace(
        settings=settings,
        executor=SimpleNamespace(parallelism=1),
        run_batch=run_batch,
        on_progress=lambda progress: None,
    )


def test_a_trial_that_would_end_past_the_budget_is_not_started(tmp_path: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runner = _runner(tmp_path, budget_s=1.0, trial_s=0.6)
    state = TuneState()
    start = time.perf_counter()
    stopped = search(runner, optuna.create_study(directions=["maximize", "maximize"]), state)  # type: ignore[arg-type]
    elapsed = time.perf_counter() - start
    # One 0.6 s trial fits a 1 s budget; a second would have ended at 1.2 s.
    assert len(state.records) == 1
    assert stopped == "time budget spent (the next trial would end past it)"
    assert elapsed < 1.0


def test_fast_trials_still_use_the_whole_budget(tmp_path: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runner = _runner(tmp_path, budget_s=0.5, trial_s=0.05)
    state = TuneState()
    stopped = search(runner, optuna.create_study(directions=["maximize", "maximize"]), state)  # type: ignore[arg-type]
    assert len(state.records) >= 4
    assert stopped.startswith("time budget spent") or stopped.startswith("the space is exhausted")
