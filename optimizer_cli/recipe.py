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
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from optimizer_cli.data import is_loader_spec, loader_file
from optimizer_cli.errors import UserInputError
from optimizer_cli.passes import PASS_REGISTRY, load_entry_points, on_registry_change

# A recipe is a short file a person reads: bounded before it is read, so a shared 10 MB file of 600,000
# passes is refused at once instead of validated for a minute.
MAX_RECIPE_BYTES = 1 << 20
MAX_PASSES = 1000
# Composing a YAML node costs ~60 us in PyYAML: 1 MB of small nodes would take 10 s before any check ran.
MAX_NODES = 50_000


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
    threads: int | None = Field(
        None,
        ge=1,
        description="Intra-op threads of the optimized model's sessions, at most benchmark.threads (null: "
        "benchmark.threads). A small model can run faster on one thread than on two (measured: PP-OCR cls "
        "1.5 ms on 2 threads, 1.1 ms on 1).",
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


class RuntimeSettings(_Strict):
    """Where the optimized model is meant to run: the benchmark measures it there (beside the CPU EP, the
    reference), and `tune` writes its winner's target here."""

    target: str | None = Field(
        None,
        description="A run target PROVIDER[@DEVICE][:PRECISION][:KEY=VALUE], e.g. openvino:f32, openvino@gpu:f16, "
        "trt:fp16 (see `optimize providers`); null: onnxruntime's CPU EP.",
    )

    @model_validator(mode="after")
    def _valid_target(self) -> RuntimeSettings:
        if self.target is not None:
            from optimizer_cli.runtime.targets import parse_target

            try:
                self.target = parse_target(self.target).label
            except UserInputError as exc:
                raise ValueError(str(exc)) from None
        return self


def _pass_union() -> Any:
    configs = tuple(cls.Config for cls in PASS_REGISTRY.values())
    return Annotated[Union[configs], Field(discriminator="type")]  # noqa: UP007


class Recipe(_Strict):
    name: str = Field("recipe", description="Shown in reports.")
    description: str = Field("", description="Free text.")
    # max_length: the pass limit holds for --set and for recipes built in code too (the file is counted earlier).
    passes: list[_pass_union()] = Field(  # type: ignore[valid-type]
        [], max_length=MAX_PASSES, description="Passes, run in order."
    )
    verify: VerifySettings = Field(VerifySettings(), description="Checks between passes.")
    data: DataSettings = Field(DataSettings(), description="Data for calibration, evaluation and random inputs.")
    benchmark: BenchmarkSettings = Field(BenchmarkSettings(), description="Benchmark settings.")
    metrics: MetricsSettings = Field(MetricsSettings(), description="What the outputs are and how they are scored.")
    session: SessionSettings = Field(
        SessionSettings(),
        description="onnxruntime session options for the optimized model (what the benchmark uses for it and a "
        "deployment should use)",
    )
    runtime: RuntimeSettings = Field(
        RuntimeSettings(), description="The run target the optimized model is meant for (provider, device, precision)."
    )


def _rebuild_pass_union() -> None:
    """A pass registered (or removed) after import: recipes validate against the registry as it is now."""
    union: Any = _pass_union()
    Recipe.model_fields["passes"].annotation = list[union]
    Recipe.model_rebuild(force=True)


on_registry_change(_rebuild_pass_union)
load_entry_points()  # installed packages' passes (entry point group optimizer_cli.passes)


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
    """YAML that parses but that we will not construct (alias bombs, recursion, deep nesting, duplicate keys)."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line  # 1-based line of the offending node, where one is to blame


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


def _check_duplicate_keys(root: yaml.Node) -> None:
    """Refuse a mapping that repeats a key: PyYAML keeps the last one silently (a second `passes:` would
    replace the first). Merge keys (`<<`) are YAML's way to override and are not counted."""
    seen_nodes: set[int] = set()
    stack = [root]
    while stack:  # iterative, and each node once: an alias shares its anchor's node
        node = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key, _value in node.value:
                if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                    continue
                line = key.start_mark.line + 1
                if key.value in first:
                    raise _Refused(f"duplicate key '{key.value}' (first at line {first[key.value]})", line)
                first[key.value] = line
        stack.extend(_children(node))


def _check_pass_count(root: yaml.Node, limit: int) -> None:
    """Count a recipe's passes on the composed document, before anything is constructed or validated."""
    if not isinstance(root, yaml.MappingNode):
        return
    for key, value in root.value:
        named = isinstance(key, yaml.ScalarNode) and key.value == "passes"
        if named and isinstance(value, yaml.SequenceNode) and len(value.value) > limit:
            raise _Refused(f"{len(value.value)} passes; a recipe has at most {limit}", value.start_mark.line + 1)


def _prescan(text: str, max_passes: int) -> None:
    """Count YAML nodes and the top-level `passes` items on the event stream (libyaml's parser where installed),
    stopping at the first limit crossed: an oversized recipe is refused in milliseconds, before it is composed.
    YAML errors are left to the parse proper, which names their line."""
    depth, nodes, passes = 0, 0, 0
    root_mapping, key_turn, after_passes_key, in_passes = False, True, False, False
    passes_line = 0
    try:
        for event in yaml.parse(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
            if isinstance(event, yaml.NodeEvent):  # scalars, aliases and collection starts
                nodes += 1
                if nodes > MAX_NODES:
                    raise _Refused(f"over {MAX_NODES} YAML nodes; a recipe is a short file", event.start_mark.line + 1)
                if depth == 0:
                    root_mapping = isinstance(event, yaml.MappingStartEvent)
                elif depth == 1 and root_mapping:
                    if key_turn:
                        after_passes_key = isinstance(event, yaml.ScalarEvent) and event.value == "passes"
                    else:
                        in_passes = after_passes_key and isinstance(event, yaml.SequenceStartEvent)
                        passes_line = event.start_mark.line + 1
                    key_turn = not key_turn
                elif depth == 2 and in_passes:
                    passes += 1
                    if passes > max_passes:
                        raise _Refused(f"over {max_passes} passes; a recipe has at most {max_passes}", passes_line)
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
                in_passes = in_passes and depth >= 2
    except _Refused:
        raise
    except yaml.YAMLError:
        return


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _safe_load(text: str, max_passes: int | None = None) -> Any:
    """yaml.safe_load, refusing alias bombs, recursive aliases, duplicate keys and (with `max_passes`) too
    many passes before anything is constructed."""
    if max_passes is not None:
        _prescan(text, max_passes)
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        _check_aliases(root)
        if max_passes is not None:
            _check_pass_count(root, max_passes)
        _check_duplicate_keys(root)
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
    if len(text) > MAX_RECIPE_BYTES or len(text.encode("utf-8", "replace")) > MAX_RECIPE_BYTES:
        raise UserInputError(f"{source}: refused: a recipe is at most 1 MB ({MAX_RECIPE_BYTES} bytes)")
    try:
        data = _safe_load(text, max_passes=MAX_PASSES)
    except _Refused as exc:
        where = f"{source}:{exc.line}" if exc.line else source
        raise UserInputError(f"{where}: refused: {exc}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserInputError(f"{where}: invalid YAML ({problem})") from exc
    if data is None:
        # An empty file or a bare `null` would otherwise run zero passes and report success.
        raise UserInputError(f"{source}: empty recipe: a recipe is a YAML mapping with a 'passes' list")
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
    too_big = f"refused: a recipe is at most 1 MB ({MAX_RECIPE_BYTES} bytes)"
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise UserInputError(f"{too_big}; this file has {path.stat().st_size}", path)
        with path.open("rb") as f:  # bounded: a device or a growing file has no honest size
            raw = f.read(MAX_RECIPE_BYTES + 1)
        if len(raw) > MAX_RECIPE_BYTES:
            raise UserInputError(too_big, path)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserInputError(f"cannot read recipe ({exc.__class__.__name__})", path) from exc
    return parse_recipe(text, str(path), overrides)


# The shipped recipes are package data, so a pip-installed user has them: `--recipe int8` names one.
PRESETS_DIR = Path(__file__).resolve().parent / "recipes"


def presets() -> dict[str, Path]:
    """Preset name (the file's stem) -> its YAML file, sorted by name."""
    return dict(sorted((p.stem, p) for p in PRESETS_DIR.glob("*.yaml")))


def preset_path(name: str) -> Path:
    """A shipped recipe's file by name (with or without .yaml); an unknown name is a UserInputError."""
    known = presets()
    found = known.get(name.removesuffix(".yaml"))
    if found is None:
        raise UserInputError(f"no preset '{name}'{_did_you_mean(name, list(known))} (presets: {', '.join(known)})")
    return found


def resolve_recipe(text: str | Path) -> tuple[Path, str | None]:
    """What --recipe TEXT names: (file, None) when that file exists (a file always wins), else (the preset's
    file, its name) when TEXT is a preset's name with or without .yaml, else a UserInputError listing the presets."""
    path = Path(text)
    if path.exists():
        return path, None
    raw = str(text)
    known = presets()
    name = raw.removesuffix(".yaml")
    # A path with a folder is a file the user meant, never a preset: `recipes/int8.yaml` (the old layout)
    # is reported as missing, with the preset it probably meant.
    if name in known and path.name == raw:
        return known[name], name
    hint = _did_you_mean(path.name.removesuffix(".yaml"), list(known))
    raise UserInputError(f"no such file or preset '{raw}'{hint} (presets: {', '.join(known)})")


def preset_of(path: str | Path) -> str | None:
    """The preset's name when `path` is a shipped recipe's file (what a report records), else None."""
    resolved = Path(path).resolve()
    return next((name for name, file in presets().items() if file == resolved), None)


def describe_source(path: Path, preset: str | None) -> str | None:
    """The line that says which recipe --recipe picked: always for a preset, and for a file only when a preset
    of the same name exists (the file won); None when there is nothing to say."""
    if preset is not None:
        return f"recipe: preset '{preset}' ({path})"
    name = path.name.removesuffix(".yaml")
    if str(path) == path.name and name in presets():  # typed as a bare name, which could have meant the preset
        return f"recipe: file {path} (not the preset '{name}': a file always wins)"
    return None


def summary(description: str) -> str:
    """A description's first sentence on one line (what `optimize recipes` lists)."""
    text = " ".join(description.split())
    end = re.search(r"\.(\s|$)", text)
    return text[: end.start() + 1] if end else text


def preset_list() -> list[dict[str, Any]]:
    """Every preset: name, one-line summary, full description, passes and file (`optimize recipes --json`)."""
    items = []
    for name, path in presets().items():
        rec = load_recipe(path)
        items.append(
            {
                "name": name,
                "summary": summary(rec.description),
                "description": " ".join(rec.description.split()),
                "passes": [p.type for p in rec.passes],
                "path": str(path),
            }
        )
    return items


def empty_recipe(overrides: list[str] | None = None) -> Recipe:
    return parse_recipe("{}", "<no recipe>", overrides)


# Pass options that name a data source read like --data: a loader there is code the run imports.
DATA_SOURCE_OPTIONS = frozenset({"train_data"})
# Execution-provider options (benchmark.providers' KEY=VALUE) that make onnxruntime load a native library:
# TensorRT's trt_extra_plugin_lib_paths, QNN's backend_path, and any *_lib / *_library / plugin option.
_LIBRARY_OPTION = re.compile(r"(^|_)(lib|libs|library|plugin)(_|$)|(^|_)backend_path$", re.IGNORECASE)


@dataclass(frozen=True)
class CodeReference:
    """A recipe value naming code a run would import: a loader 'file.py:function' or 'module:function'."""

    key: str  # where in the recipe, e.g. "data.calibration", "passes.2.train_data"
    spec: str  # as written
    file: Path | None  # the .py file that would be executed (absolute); None for 'module:function'

    def what(self) -> str:
        return str(self.file) if self.file is not None else f"module {self.spec.rpartition(':')[0]}"

    def as_dict(self) -> dict[str, str | None]:
        return {"key": self.key, "spec": self.spec, "file": str(self.file) if self.file else None}


def code_references(rec: Recipe) -> list[CodeReference]:
    """Every recipe value that names code: data.calibration, data.evaluation and the passes' data options.
    (metrics.task is a built-in name and metrics.charset a text file: neither is code.)"""
    found = [("data.calibration", rec.data.calibration), ("data.evaluation", rec.data.evaluation)]
    for i, cfg in enumerate(rec.passes):
        found += [(f"passes.{i}.{name}", getattr(cfg, name, None)) for name in sorted(DATA_SOURCE_OPTIONS)]
    refs = []
    for key, spec in found:
        if isinstance(spec, str) and is_loader_spec(spec):
            file = loader_file(spec)
            refs.append(CodeReference(key, spec, file.resolve() if file is not None else None))
    return refs + _library_options(rec)


def _library_options(rec: Recipe) -> list[CodeReference]:
    """benchmark.providers entries (PROVIDER[:KEY=VALUE...]) whose options name a library to load."""
    refs = []
    for i, target in enumerate(rec.benchmark.providers or []):
        for item in target.split(":")[1:]:
            key, eq, value = item.partition("=")
            if eq and _LIBRARY_OPTION.search(key.strip()) and value.strip():
                first = value.strip().split(";")[0]  # TensorRT takes a ';'-separated list
                refs.append(CodeReference(f"benchmark.providers.{i}", item.strip(), Path(first).resolve()))
    return refs


def _same_loader(a: str, b: str) -> bool:
    """Two specs naming one function: a file loader by its resolved path, a module by its name."""
    (a_target, _, a_func), (b_target, _, b_func) = a.rpartition(":"), b.rpartition(":")
    if a_func != b_func:
        return False
    if a_target.endswith(".py") and b_target.endswith(".py"):
        return Path(a_target).resolve() == Path(b_target).resolve()
    return a_target == b_target


def set_values(overrides: list[str]) -> list[str]:
    """The string values typed in --set assignments (what the user named on the command line)."""
    values = []
    for assignment in overrides:
        value = _parse_scalar(assignment.partition("=")[2]) if "=" in assignment else None
        if isinstance(value, str):
            values.append(value)
    return values


def unconsented_code(
    rec: Recipe,
    *,
    allow_code: bool = False,
    calibration: str | None = None,
    evaluation: str | None = None,
    providers: str | None = None,
    command_line: Iterable[str | None] = (),
) -> list[CodeReference]:
    """The code a run of `rec` would import that nobody asked for: a shared recipe's loader runs only with
    --allow-code or when the same loader is given on the command line (--calib, --data, --set).
    `calibration` / `evaluation` / `providers` are --calib / --data / --providers: they replace the recipe's
    own, which then never runs."""
    if allow_code:
        return []
    given = [s for s in (calibration, evaluation, *command_line) if s]
    replaced = {"data.calibration": calibration is not None, "data.evaluation": evaluation is not None}
    return [
        ref
        for ref in code_references(rec)
        if not replaced.get(ref.key)
        and not (providers and ref.key.startswith("benchmark.providers."))
        and not any(_same_loader(ref.spec, s) for s in given)
    ]


def code_consent_problem(refs: list[CodeReference]) -> str:
    """One line naming the first file that would run and how to consent."""
    ref = refs[0]
    if ref.key in ("data.calibration", "data.evaluation"):
        also = f" or give it as {'--calib' if ref.key == 'data.calibration' else '--data'} {ref.spec}"
    elif ref.key.startswith("benchmark.providers."):
        also = " or choose the targets on the command line (--providers)"
    else:
        also = " or give the same loader as --calib/--data"
    more = f" (and {len(refs) - 1} more)" if len(refs) > 1 else ""
    return (
        f"{ref.key} names code that would run: {ref.what()} ('{ref.spec}'); recipes run code only with consent: "
        f"add --allow-code{also}{more}"
    )


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
