from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def examples_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quick-start example models and data, built once per test session."""
    from optimizer_cli.examples import write_examples

    out = tmp_path_factory.mktemp("examples")
    write_examples(out)
    return out


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """The installed entry point, as a user runs it (exit codes and stdout exactly as seen)."""
    env = dict(os.environ, ORT_DISABLE_TELEMETRY="1", COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "optimizer_cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=env,
        timeout=timeout,
        check=False,
    )


# The fast suite (README: `-m "not slow"`) must stay under 8 minutes on 2 cores and start no Ray cluster: these
# tests, 5-45 s each on a 2-core Xeon (measured with --durations in CI), run in CI's second, slow pass instead.
HEAVY = {
    "tests/test_corpus.py::test_model_test_corpus_through_the_pipeline",
    "tests/test_corpus.py::test_node_test_corpus",
    "tests/test_trust.py::test_every_shipped_recipe_prints_one_json_document",
    "tests/test_trust.py::test_external_data_model_runs_from_any_folder",
    "tests/test_trust.py::test_verification_failure_offers_the_patch_that_passes",
    "tests/test_trust.py::test_a_slower_model_is_called_slower",
    "tests/test_tune.py::test_interrupted_study_resumes_to_the_same_trials_and_winner",
    "tests/test_tune.py::test_tune_refuses_bad_requests_before_any_work",
    "tests/test_tune.py::test_tune_through_a_local_ray",
    "tests/test_tune.py::test_tune_fans_out_over_several_models",
    "tests/test_tune.py::test_tune_writes_the_winner_and_a_recipe_that_reproduces_it",
    "tests/test_json_schemas.py::test_the_document_matches_its_schema",
    "tests/test_schema_version.py::test_every_json_document_says_its_schema_version",
    "tests/test_attribution.py::test_verification_failure_of_static_int8_gets_a_patch_that_passes",
    "tests/test_attribution.py::test_cli_prints_a_patch_that_meets_the_threshold",
    "tests/test_attribution.py::test_loss_at_prune_blames_prune_and_prints_no_quantize_patch",
    "tests/test_quiet.py::test_quickstart_with_q_prints_only_the_table_and_verdict",
    "tests/test_truth_tune.py::test_the_reproduce_command_works_from_another_folder",
    "tests/test_cli.py::test_verbs",
    "tests/test_output_kinds.py::test_cli_reports_map_iou_and_gates_it",
    "tests/test_tune_targets.py::test_a_repeated_proposal_is_listed_so_no_trial_number_is_missing",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """HEAVY tests and every test of a local Ray cluster are marked slow. Tests marked `openvino` need the
    OpenVINO EP plugin (extra `openvino`) with a device on this host: they skip, saying why, where it offers none
    (an AMD CPU) or is not installed."""
    for item in items:
        if item.nodeid.split("[")[0] in HEAVY or "ray_executor" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    marked = [item for item in items if item.get_closest_marker("openvino")]
    if not marked:
        return
    from optimizer_cli.runtime.providers import probe_provider

    status = probe_provider("openvino")
    if status.usable:
        return
    skip = pytest.mark.skip(reason=f"OpenVINO EP not usable here: {status.reason}")
    for item in marked:
        item.add_marker(skip)
