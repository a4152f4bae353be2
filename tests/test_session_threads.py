"""The optimized model may run on fewer intra-op threads than the original (a recipe's session.threads; tune's
`threads` dimension): a model of a millisecond or two can be faster on one thread than on two. Never more."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from optimizer_cli.errors import UserInputError
from optimizer_cli.recipe import Recipe
from optimizer_cli.runtime.targets import deployment_snippet, parse_target
from optimizer_cli.search.candidates import RecipeContext, recipe_for, summary
from optimizer_cli.search.space import fewer_threads_dimension
from optimizer_cli.search.tune import complexity
from optimizer_cli.workflows.common import BenchOptions, bench_settings

from .builders import mlp


def _recipe(threads: int | None) -> Recipe:
    return Recipe.model_validate({"name": "t", "passes": [{"type": "cleanup"}], "session": {"threads": threads}})


def test_the_optimized_sessions_take_the_recipes_thread_count() -> None:
    settings = bench_settings(_recipe(1), BenchOptions(providers="cpu"), threads=2)
    assert settings.session_config("cpu").threads == 2  # the original keeps the benchmark's
    assert settings.session_config("cpu", optimized=True).threads == 1
    assert bench_settings(_recipe(None), BenchOptions(providers="cpu"), 2).session_config("cpu", True).threads == 2


def test_more_threads_for_the_optimized_model_than_the_original_is_refused() -> None:
    with pytest.raises(UserInputError, match="session.threads 4 exceeds the benchmark's 2 threads"):
        bench_settings(_recipe(4), BenchOptions(providers="cpu"), threads=2)


def test_tune_searches_one_thread_and_the_winner_says_it(tmp_path: Path) -> None:
    dim = fewer_threads_dimension()
    assert dim.choices == (None, 1)
    ctx = RecipeContext(None, {}, 2, "cpu")
    one = recipe_for({"quantize": "none", "threads": 1}, ctx)
    assert one["session"]["threads"] == 1 and "threads" not in recipe_for({"quantize": "none"}, ctx)["session"]
    Recipe.model_validate(one)  # a recipe the pipeline accepts
    assert summary({"quantize": "none", "threads": 1}) == "cleanup + fuse [threads=1]"
    assert complexity({"threads": 1}) > complexity({"threads": None})  # a tie keeps the benchmark's threads
    path = tmp_path / "m.onnx"
    onnx.save(mlp(), path)
    scope: dict = {}
    exec(compile(deployment_snippet(parse_target("cpu"), str(path), 2, one["session"]), "snippet", "exec"), scope)
    assert scope["options"].intra_op_num_threads == 1


def test_starting_points_keep_the_benchmarks_threads() -> None:
    """None is a choice of the threads dimension: a starting point that does not name it takes the first
    choice (the benchmark's threads), not a KeyError (every tune with --threads 2 failed so)."""
    from optimizer_cli.search.space import Dimension
    from optimizer_cli.search.tune import starting_points

    dims = [Dimension("quantize", ("none", "dynamic"), "mode"), fewer_threads_dimension()]
    points = starting_points(dims)
    assert points and all(p["threads"] is None for p in points)


def test_peak_memory_is_measured_with_the_recipes_thread_count(tmp_path: Path) -> None:
    """The memory child process overlays the recipe's session options: `threads` among them was a second
    keyword for SessionConfig (TypeError), and the optimized model's memory came back None."""
    from optimizer_cli.bench.memory import session_peak_memory

    from .builders import random_feed

    path = tmp_path / "m.onnx"
    onnx.save(mlp(), path)
    peak = session_peak_memory(path, random_feed(mlp(), batch=1), "cpu", 2, {"threads": 1, "opt_level": "all"})
    assert peak is not None and peak["peak_mb"] > 0
