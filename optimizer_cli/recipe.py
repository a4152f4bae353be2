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

import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

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
    calibration: str | None = Field(
        None,
        description='Calibration data: .npz, folder of .npy or of per-sample .npz, a loader file.py:function, or "random".',
    )
    evaluation: str | None = Field(
        None, description="Evaluation data for accuracy (the same forms as calibration, without random)."
    )
    calibration_samples: int | None = Field(
        None,
        ge=1,
        description="Calibration samples read (null: all of a stacked file; of a per-sample source or a loader, "
        "the most any pass asks for, at least 64). --calib-samples sets it and every pass's calibration_samples.",
    )
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
    max_seconds: float = Field(
        300.0,
        gt=0,
        description="Wall-time budget per provider for accuracy and latency (like trtexec --duration): when one "
        "inference is slow, fewer samples and runs are used and the report says so.",
    )


class SessionSettings(_Strict):
    """onnxruntime session options for the optimized model: the benchmark times it with them (the original
    keeps the benchmark's), and a deployment should create its sessions with them."""

    opt_level: Literal["disable", "basic", "extended", "all"] | None = Field(
        None, description="Graph optimization level of the optimized model's sessions (null: benchmark.opt_level)."
    )
    execution_mode: Literal["sequential", "parallel"] = Field(
        "sequential",
        description="sequential: one node at a time; parallel: independent branches run at once on inter-op "
        "threads (helps graphs with parallel branches, costs threads).",
    )
    mem_pattern: bool = Field(
        True,
        description="Preallocate memory from the first run's allocation pattern (onnxruntime's enable_mem_pattern); "
        "off can help when input shapes vary.",
    )
    inter_op_threads: int | None = Field(
        None, ge=1, description="Threads for independent nodes, parallel mode only (null: onnxruntime's default)."
    )

    @model_validator(mode="after")
    def _inter_op_needs_parallel(self) -> SessionSettings:
        # onnxruntime ignores inter-op threads when it runs nodes one at a time: a setting that does nothing.
        if self.inter_op_threads is not None and self.execution_mode != "parallel":
            raise ValueError("inter_op_threads applies only with execution_mode: parallel")
        return self


OutputKindName = Literal["class_scores", "sequence_logits", "dense_map", "embedding", "regression"]
OUTPUT_KINDS: tuple[str, ...] = OutputKindName.__args__  # type: ignore[attr-defined]


class MetricsSettings(_Strict):
    outputs: dict[str, OutputKindName] = Field(
        {},
        description="Kind of a graph output by name (class_scores, sequence_logits, dense_map, embedding, "
        "regression), where the shape-and-values heuristic guesses wrong; picks its fidelity figures.",
    )
    map_threshold: float = Field(
        0.3, gt=0, lt=1, description="Threshold of dense maps for map_iou and miou (0.3 like DB text detectors)."
    )
    charset: str | None = Field(
        None,
        description="builtin:cer alphabet: a text file, one character per line (index i+1; 0 is the CTC blank); "
        "null: the model's metadata_props 'character' list (PaddleOCR exports).",
    )
    task: Literal["cer", "miou"] | None = Field(
        None, description="Built-in task metric with labels (as --metric builtin:NAME; the flag wins)."
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
    metrics: MetricsSettings = Field(MetricsSettings(), description="What the outputs are and how they are scored.")
    session: SessionSettings = Field(
        SessionSettings(),
        description="onnxruntime session options for the optimized model (what the benchmark uses for it and a "
        "deployment should use)",
    )


def _line_map(text: str) -> dict[tuple, int]:
    """YAML path -> 1-based line, so validation errors can name the line of the bad key."""
    lines: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                key_path = (*path, key.value)
                lines[key_path] = key.start_mark.line + 1
                walk(value, key_path)
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


def _did_you_mean(word: object, known: list[str]) -> str:
    close = difflib.get_close_matches(str(word), known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _list_index(items: list, part: str, assignment: str, where: str) -> int:
    """A list item by position, or a pass by its `label` (`passes.myquant.mode=static`)."""
    if part.isdigit():
        if int(part) >= len(items):
            raise UserInputError(f"--set '{assignment}': no list item {part} at {where}")
        return int(part)
    labels = [i for i, item in enumerate(items) if isinstance(item, dict) and item.get("label") == part]
    if len(labels) > 1:
        raise UserInputError(f"--set '{assignment}': label '{part}' is used by several items at {where}")
    if not labels:
        known = [str(item["label"]) for item in items if isinstance(item, dict) and item.get("label")]
        raise UserInputError(
            f"--set '{assignment}': no list item {part} at {where}{_did_you_mean(part, known)}"
            + (f" (labels: {', '.join(known)})" if known else "")
        )
    return labels[0]


def apply_override(data: dict, assignment: str) -> tuple[str | int, ...]:
    """`passes.1.mode=static` / `passes.myquant.mode=static` / `benchmark.providers=[cpu]`.

    Returns the path it set, with labels resolved to indices (errors there are blamed on the flag).
    """
    if "=" not in assignment:
        raise UserInputError(f"--set '{assignment}': expected KEY=VALUE")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise UserInputError(f"--set '{assignment}': empty key")
    path: list[str | int] = []
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            index = _list_index(node, part, assignment, ".".join(parts[:i]) or "top")
            path.append(index)
            node = node[index]
        else:
            path.append(part)
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise UserInputError(f"--set '{assignment}': '{'.'.join(parts[: i + 1])}' is not a section")
    last = parts[-1]
    value = _parse_scalar(raw)
    if isinstance(node, list):
        index = _list_index(node, last, assignment, ".".join(parts[:-1]) or "top")
        path.append(index)
        node[index] = value
    else:
        path.append(last)
        node[last] = value
    return tuple(path)


def _config_fields(loc: tuple, data: Any) -> list[str]:
    """The keys allowed at `loc` (a mapping's path), following pass types through `passes`."""
    model: type[BaseModel] = Recipe
    node = data
    i = 0
    while i < len(loc):
        part = loc[i]
        node = node.get(part) if isinstance(node, dict) else None
        if model is Recipe and part == "passes":
            if i + 1 >= len(loc):
                return []
            index = loc[i + 1]
            item = node[index] if isinstance(node, list) and isinstance(index, int) and index < len(node) else None
            cls = PASS_REGISTRY.get(str(item.get("type"))) if isinstance(item, dict) else None
            if cls is None:
                return []
            model, node = cls.Config, item
            i += 2
            continue
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
        i += 1
    return list(model.model_fields)


def _field_loc(err: Mapping[str, Any], data: Any) -> tuple:
    """The error's path in the recipe: without pydantic's pass tag and union-member names."""
    tags = {c.Config.__name__ for c in PASS_REGISTRY.values()}
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in tags))
    # pydantic puts the discriminator tag in loc (e.g. ('passes', 0, 'quantize', 'mode')): drop it.
    loc = tuple(p for i, p in enumerate(loc) if not (i == 2 and loc[0] == "passes" and p in PASS_REGISTRY))
    if err["type"] == "extra_forbidden":
        return loc
    # A union reports one error per member, under names like 'bool' or "literal['auto']" that are not
    # in the input: cut the path where the input ends so they group as one problem.
    node = data
    for n, part in enumerate(loc):
        in_dict = isinstance(node, dict) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and part < len(node)
        if not (in_dict or in_list):
            return loc[:n]
        node = node[part]
    return loc


def _flag_for(loc: tuple, overridden: dict[tuple, str]) -> str | None:
    """The --set assignment that set `loc`, something inside it, or something containing it (the last wins)."""
    for path, assignment in reversed(overridden.items()):
        if loc[: len(path)] == path or (loc and path[: len(loc)] == loc):
            return assignment
    return None


def _line_of(loc: tuple, lines: dict[tuple, int]) -> int | None:
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def _where(loc: tuple, lines: dict[tuple, int], source: str, overridden: dict[tuple, str]) -> str:
    # A value set with --set is blamed on the flag: the file's line there says something else.
    flag = _flag_for(loc, overridden)
    if flag is not None:
        return f"--set '{flag}'"
    line = _line_of(loc, lines)
    return f"{source}:{line}" if line else source


def _format_error(
    err: Mapping[str, Any],
    lines: dict[tuple, int],
    source: str,
    data: Any = None,
    overridden: dict[tuple, str] | None = None,
) -> str:
    loc = _field_loc(err, data)
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    where = _where(loc, lines, source, overridden or {})
    known = sorted(PASS_REGISTRY)
    if err["type"] == "extra_forbidden":
        hint = _did_you_mean(loc[-1], _config_fields(loc[:-1], data))
        return f"{where}: unknown key '{loc[-1]}' at {dotted}{hint}"
    if err["type"] == "union_tag_invalid":
        tag = err.get("input", {}).get("type") if isinstance(err.get("input"), dict) else None
        return f"{where}: unknown pass type '{tag}' at {dotted}{_did_you_mean(tag, known)} (known: {', '.join(known)})"
    if err["type"] == "union_tag_not_found":
        return f"{where}: pass at {dotted} has no 'type' (known: {', '.join(known)})"
    return f"{where}: {dotted}: {err['msg']}"


class RecipeProblems(UserInputError):
    """An invalid recipe: the message names the first problem; `problems` has all of them, one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        more = len(problems) - 1
        super().__init__(problems[0] + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""))


def _problems(exc: ValidationError, text: str, source: str, data: Any, overridden: dict[tuple, str]) -> list[str]:
    lines = _line_map(text)
    problems: list[str] = []
    keys: list[tuple[int, int, int]] = []
    by_loc: dict[tuple, int] = {}
    for err in exc.errors():
        loc = _field_loc(err, data)
        if err["type"] != "extra_forbidden" and loc in by_loc:
            # Union members failing on the same value: one problem, their messages joined.
            problems[by_loc[loc]] += f"; or {err['msg']}"
            continue
        by_loc.setdefault(loc, len(problems))
        # Flags first (they are what the user just typed), then the file's problems in line order.
        keys.append((_flag_for(loc, overridden) is None, _line_of(loc, lines) or 0, len(problems)))
        problems.append(_format_error(err, lines, source, data, overridden))
    return [problems[k[-1]] for k in sorted(keys)]


def parse_recipe(text: str, source: str = "<recipe>", overrides: list[str] | None = None) -> Recipe:
    """The validated recipe, or RecipeProblems (a UserInputError) listing every problem with its line."""
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
    overridden: dict[tuple, str] = {}
    for assignment in overrides or []:
        try:
            overridden[apply_override(data, assignment)] = assignment
        except _Refused as exc:
            raise UserInputError(f"--set '{assignment}': refused: {exc}") from exc
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeProblems(_problems(exc, text, source, data, overridden)) from exc


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


# What `optimize passes` shows comes from the same pydantic schema as `optimize schema`, so the
# option list, types, defaults, bounds and descriptions cannot drift apart.
_BOUND_KEYS = {"minimum": "ge", "exclusiveMinimum": "gt", "maximum": "le", "exclusiveMaximum": "lt"}


def _type_name(schema: dict[str, Any]) -> str:
    if "anyOf" in schema:
        return " | ".join(_type_name(s) for s in schema["anyOf"])
    if "enum" in schema:
        return " | ".join(str(v) for v in schema["enum"])
    if "const" in schema:
        return str(schema["const"])
    kind = schema.get("type")
    if kind == "array":
        return f"list[{_type_name(schema.get('items', {}))}]"
    if kind == "object":
        return f"dict[str, {_type_name(schema.get('additionalProperties', {}))}]"
    return {"integer": "int", "number": "float", "boolean": "bool", "string": "str", "null": "null"}.get(
        str(kind), "any"
    )


def _constraints(schema: dict[str, Any]) -> dict[str, float]:
    """pydantic's names (ge/gt/le/lt) for the numeric bounds, looking inside Optional / unions."""
    found = {_BOUND_KEYS[k]: v for k, v in schema.items() if k in _BOUND_KEYS}
    for member in schema.get("anyOf", []):
        found.update(_constraints(member))
    return found


def bounds_text(constraints: dict[str, float]) -> str:
    """{'ge': 0, 'lt': 1} -> '[0, 1)'; one-sided -> '>= 1'; none -> ''."""
    low = ("[", constraints["ge"]) if "ge" in constraints else ("(", constraints["gt"]) if "gt" in constraints else None
    high = (
        ("]", constraints["le"]) if "le" in constraints else (")", constraints["lt"]) if "lt" in constraints else None
    )
    if low and high:
        return f"{low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1]}"
    if high:
        return f"{'<=' if high[0] == ']' else '<'} {high[1]}"
    return ""


def pass_options(name: str) -> dict[str, dict[str, Any]]:
    """A pass's options (not `type`): type, default, bounds and description, all JSON values."""
    schema = PASS_REGISTRY[name].Config.model_json_schema()
    options: dict[str, dict[str, Any]] = {}
    for key, prop in schema["properties"].items():
        if key == "type":
            continue
        constraints = _constraints(prop)
        options[key] = {
            "type": _type_name(prop),
            "default": prop.get("default"),
            "bounds": bounds_text(constraints) or None,
            "constraints": constraints,
            "description": prop.get("description", ""),
        }
    return options


def pass_info(name: str) -> dict[str, Any]:
    """One pass as `optimize passes` shows it; an unknown name is a UserInputError with a suggestion."""
    if name not in PASS_REGISTRY:
        known = sorted(PASS_REGISTRY)
        raise UserInputError(f"unknown pass '{name}'{_did_you_mean(name, known)} (known: {', '.join(known)})")
    cls = PASS_REGISTRY[name]
    return {"type": name, "exactness": cls.exactness.value, "contract": cls.contract, "options": pass_options(name)}
