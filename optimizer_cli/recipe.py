"""Recipes: YAML files validated by pydantic, with line numbers in errors and --set overrides.

name: int8
passes:
  - type: fuse
  - type: quantize
    mode: dynamic
verify: {samples: 4}
benchmark: {providers: [cpu], threads: 2}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from optimizer_cli.errors import UserInputError
from optimizer_cli.passes import PASS_REGISTRY


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VerifySettings(_Strict):
    enabled: bool = Field(True, description="Check the model after every pass.")
    samples: int = Field(4, ge=1, description="Random (or --data) samples compared after every pass.")
    # numpy's seeded generator refuses negative seeds.
    seed: int = Field(0, ge=0, description="Seed of the random inputs.")
    # Exact passes must keep outputs within rtol / atol * max(1, |output|max).
    rtol: float = Field(1e-3, ge=0, description="Relative tolerance for exact passes.")
    atol: float = Field(1e-4, ge=0, description="Absolute tolerance for exact passes, times max(1, |output|max).")
    min_cosine: float | None = Field(
        None, ge=-1, le=1, description="Fail if an approximate pass drops any output's cosine below this."
    )


class DataSettings(_Strict):
    calibration: str | None = Field(None, description='Calibration data: .npz, folder of .npy, or "random".')
    evaluation: str | None = Field(None, description="Evaluation data (.npz or folder of .npy) for accuracy.")
    dims: dict[str, Annotated[int, Field(ge=1)]] = Field(
        {}, description="Symbolic dim values for random inputs, e.g. {batch: 1, sequence: 128}."
    )


class BenchmarkSettings(_Strict):
    enabled: bool = Field(True, description="Benchmark original vs optimized after the run.")
    providers: list[str] | None = Field(
        None, description="Execution providers (cpu, cuda, trt); null: every usable one."
    )
    threads: int = Field(2, ge=1, description="Intra-op threads per session.")
    warmup: int = Field(5, ge=0, description="Untimed runs per session before timing.")
    rounds: int = Field(10, ge=2, description="Interleaved A/B rounds (>= 2 for a confidence interval).")
    runs_per_round: int = Field(10, ge=1, description="Timed runs per model per round.")
    discard_after_switch: int = Field(3, ge=0, description="Runs discarded after switching model (cache effects).")
    opt_level: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="onnxruntime graph optimization level of the benchmark sessions."
    )
    trt_fp16: bool = Field(False, description="TensorRT: allow fp16 kernels.")
    trt_int8: bool = Field(False, description="TensorRT: allow int8 kernels.")
    trt_cache_dir: str | None = Field(None, description="TensorRT engine cache folder (null: no cache).")
    attribution_threshold: float = Field(
        0.99, ge=-1, le=1, description="Output cosine under which per-layer attribution runs."
    )


def _pass_union() -> Any:
    configs = tuple(cls.Config for cls in PASS_REGISTRY.values())
    return Annotated[Union[configs], Field(discriminator="type")]  # noqa: UP007


class Recipe(_Strict):
    name: str = Field("recipe", description="Shown in reports.")
    description: str = Field("", description="Free text.")
    passes: list[_pass_union()] = Field([], description="Passes, run in order.")  # type: ignore[valid-type]
    verify: VerifySettings = Field(VerifySettings(), description="Checks between passes.")
    data: DataSettings = Field(DataSettings(), description="Data for calibration, evaluation and random inputs.")
    benchmark: BenchmarkSettings = Field(BenchmarkSettings(), description="Benchmark settings.")


def _line_map(text: str) -> dict[tuple, int]:
    """YAML path -> 1-based line, so validation errors can name the line of the bad key."""
    lines: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                lines[(*path, key.value)] = key.start_mark.line + 1
                walk(value, (*path, key.value))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i))

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


# Aliases may add at most this many nodes to a document: a recipe needs few, and a 464-byte
# "billion laughs" expands to ~10^9 nodes that pydantic would walk until memory runs out.
MAX_ALIAS_NODES = 10_000


class _Refused(yaml.YAMLError):
    """YAML that parses but that we will not construct (alias bombs, recursion, deep nesting)."""


def _check_aliases(root: yaml.Node) -> None:
    """Refuse recursive aliases and alias expansion past MAX_ALIAS_NODES, without expanding anything.

    The composed document is a DAG when aliases are used (a graph with cycles when an alias points
    into its own anchor); its expanded size is computed once per node, bottom-up, iteratively
    (deep alias chains must not hit Python's recursion limit).
    """
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in _children(node))
            continue
        if key in size:
            continue
        if key in on_path:
            raise _Refused("an alias refers to its own anchor (recursive structure)")
        on_path.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                raise _Refused("an alias refers to its own anchor (recursive structure)")
            if id(child) not in size:
                stack.append((child, False))
    unique = len(size)
    if size[id(root)] - unique > MAX_ALIAS_NODES:
        raise _Refused(f"aliases expand the document past {MAX_ALIAS_NODES} extra nodes")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _safe_load(text: str) -> Any:
    """yaml.safe_load, refusing alias bombs and recursive aliases before anything is constructed."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        _check_aliases(root)
        return loader.construct_document(root)
    except RecursionError as exc:  # PyYAML's composer recurses once per nesting level
        raise _Refused("YAML nested too deeply") from exc
    finally:
        loader.dispose()


def _parse_scalar(text: str) -> Any:
    try:
        return _safe_load(text)
    except _Refused:
        raise
    except yaml.YAMLError:
        return text


def apply_override(data: dict, assignment: str) -> None:
    """`passes.1.mode=static` / `benchmark.providers=[cpu]` / `verify.samples=8`."""
    if "=" not in assignment:
        raise UserInputError(f"--set '{assignment}': expected KEY=VALUE")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise UserInputError(f"--set '{assignment}': empty key")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserInputError(f"--set '{assignment}': no list item {part} at {'.'.join(parts[:i]) or 'top'}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise UserInputError(f"--set '{assignment}': '{'.'.join(parts[: i + 1])}' is not a section")
    last = parts[-1]
    value = _parse_scalar(raw)
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise UserInputError(f"--set '{assignment}': no list item {last}")
        node[int(last)] = value
    else:
        node[last] = value


def _format_error(err: dict, lines: dict[tuple, int], source: str) -> str:
    loc = tuple(
        p for p in err["loc"] if not (isinstance(p, str) and p in {c.Config.__name__ for c in PASS_REGISTRY.values()})
    )
    # pydantic puts the discriminator tag in loc (e.g. ('passes', 0, 'quantize', 'mode')): drop it.
    loc = tuple(p for i, p in enumerate(loc) if not (i == 2 and loc[0] == "passes" and p in PASS_REGISTRY))
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    line = None
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            line = lines[loc[:n]]
            break
    where = f"{source}:{line}" if line else source
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key '{loc[-1]}' at {dotted}"
    if err["type"] == "union_tag_invalid":
        tag = err.get("input", {}).get("type") if isinstance(err.get("input"), dict) else None
        return f"{where}: unknown pass type '{tag}' at {dotted} (known: {', '.join(sorted(PASS_REGISTRY))})"
    if err["type"] == "union_tag_not_found":
        return f"{where}: pass at {dotted} has no 'type' (known: {', '.join(sorted(PASS_REGISTRY))})"
    return f"{where}: {dotted}: {err['msg']}"


def parse_recipe(text: str, source: str = "<recipe>", overrides: list[str] | None = None) -> Recipe:
    try:
        data = _safe_load(text)
    except _Refused as exc:
        raise UserInputError(f"{source}: refused: {exc}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserInputError(f"{where}: invalid YAML ({problem})") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserInputError(f"{source}: a recipe is a YAML mapping with a 'passes' list")
    for assignment in overrides or []:
        try:
            apply_override(data, assignment)
        except _Refused as exc:
            raise UserInputError(f"--set '{assignment}': refused: {exc}") from exc
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        lines = _line_map(text)
        first = exc.errors()[0]
        more = len(exc.errors()) - 1
        message = _format_error(first, lines, source)
        if more:
            message += f" (and {more} more problem{'s' if more > 1 else ''})"
        raise UserInputError(message) from exc


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.exists():
        raise UserInputError("recipe file not found", path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserInputError(f"cannot read recipe ({exc.__class__.__name__})", path) from exc
    return parse_recipe(text, str(path), overrides)


def empty_recipe(overrides: list[str] | None = None) -> Recipe:
    return parse_recipe("{}", "<no recipe>", overrides)


def recipe_json_schema() -> str:
    return json.dumps(TypeAdapter(Recipe).json_schema(), indent=2)
