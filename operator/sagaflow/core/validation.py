"""Loading and validating manifests: YAML text in, models and every problem out.

This module owns the rules a manifest must satisfy beyond its field types: the
envelope (`apiVersion`, `kind`), cross-field rules of a Workflow (valid
templates, known step types, literal inputs of the built-in steps) and rules
across documents (unique names, Executions naming a known Workflow). The step
graphs (unique names, known dependencies, no cycles, templates that only read
upstream outputs) and the data-flow rules (`when`, `forEach`, `finally`,
signals, child workflows) live in `sagaflow.core.flow_validation`, the saga rules
in `sagaflow.core.saga_validation`; this module runs them all.

It is pure so that local mode, the CLI and the operator's admission path report
the same problems the same way. It never raises for bad input and never stops
at the first problem: people fix manifests faster when they see everything at
once, each problem with the field path as written in YAML (camelCase).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import ValidationError

from sagaflow.core import expressions
from sagaflow.core import flow_validation as flow
from sagaflow.core.definition import BUILTIN_TYPES, FAIL, WAIT, WAIT_SIGNAL
from sagaflow.core.durations import parse_duration
from sagaflow.core.jsonsafe import unstorable
from sagaflow.core.manifests import (
    API_VERSION,
    NAME_PATTERN,
    STEP_NAME_PATTERN,
    STEP_TYPE_PATTERN,
    Execution,
    StepSpec,
    Workflow,
)
from sagaflow.core.saga_validation import saga_problems, skip_compensation_problems
from sagaflow.core.trigger_specs import Schedule, Trigger

KINDS = ("Workflow", "Execution", "Schedule", "Trigger")
# libyaml's loader where PyYAML was built with it: ten times faster on big files.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MODELS: dict[str, type[Workflow | Execution | Schedule | Trigger]] = {
    "Workflow": Workflow,
    "Execution": Execution,
    "Schedule": Schedule,
    "Trigger": Trigger,
}
# Pydantic reports regex mismatches by quoting the regex; people need the rule.
_PATTERN_RULES = {
    NAME_PATTERN: "must be a DNS label: lowercase letters, digits and '-', "
    "starting and ending with a letter or digit",
    STEP_NAME_PATTERN: "must start with a letter and hold only letters, digits, '_' and '-' "
    "(at most 63 characters)",
    STEP_TYPE_PATTERN: "must be a dotted name such as 'payments.charge' (segments of letters, "
    "digits, '_' and '-', each starting with a letter)",
}
# Pydantic speaks Python; manifests are YAML, where tuples are lists and dicts mappings.
_YAML_WORDS = (
    ("a valid tuple", "a list"),
    ("Tuple should", "List should"),
    (" after validation", ""),
    ("a valid dictionary", "a mapping"),
)
_MODEL_INSTANCE = re.compile(r" or instance of \w+")


@dataclass(frozen=True)
class ManifestError:
    """One problem in one document, located by file, document and field path."""

    source: str
    document: int
    kind: str | None
    name: str | None
    path: str
    reason: str

    def __str__(self) -> str:
        label = " ".join(part for part in (self.kind, self.name) if part)
        head = f"{self.source}: document {self.document}"
        if label:
            head += f" ({label})"
        return f"{head}: {self.path}: {self.reason}" if self.path else f"{head}: {self.reason}"


@dataclass(frozen=True)
class Document:
    """One YAML document that parsed to a mapping; `index` is 1-based within `source`."""

    source: str
    index: int
    body: dict[str, Any]


@dataclass
class ValidationResult:
    """Valid models (documents without any error) and all problems found."""

    workflows: list[tuple[Document, Workflow]] = field(default_factory=list)
    executions: list[tuple[Document, Execution]] = field(default_factory=list)
    schedules: list[tuple[Document, Schedule]] = field(default_factory=list)
    triggers: list[tuple[Document, Trigger]] = field(default_factory=list)
    errors: list[ManifestError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


# -------------------------------------------------------------------- parsing


def parse_documents(text: str, source: str) -> tuple[list[Document], list[ManifestError]]:
    """Split multi-document YAML into mapping documents; empty documents are skipped.

    PyYAML cannot resume after a syntax error, so documents before it are kept
    and the error names the line and column where parsing stopped. libyaml parses
    (ten times faster on big files); a file it refuses is parsed again by PyYAML's
    own loader, whose messages say more ("expected ',' or ']', but got ':'").
    """
    if _LOADER is not yaml.SafeLoader:
        try:
            bodies = list(yaml.load_all(text, Loader=_LOADER))
        except yaml.YAMLError:
            pass
        else:
            return _documents(bodies, source)
    return _parse_slowly(text, source)


def _documents(bodies: list[Any], source: str) -> tuple[list[Document], list[ManifestError]]:
    documents: list[Document] = []
    errors: list[ManifestError] = []
    for index, body in enumerate(bodies, start=1):
        if body is None:
            continue
        if isinstance(body, dict):
            documents.append(Document(source, index, body))
        else:
            errors.append(ManifestError(source, index, None, None, "", _not_a_mapping(body)))
    return documents, errors


def _not_a_mapping(body: Any) -> str:
    return (
        "a manifest must be a mapping with apiVersion, kind, metadata and spec, "
        f"got {_describe(body)}"
    )


def _parse_slowly(text: str, source: str) -> tuple[list[Document], list[ManifestError]]:
    bodies: list[Any] = []
    try:
        for body in yaml.safe_load_all(text):
            bodies.append(body)
    except yaml.YAMLError as error:
        documents, errors = _documents(bodies, source)
        reason = _yaml_reason(error)
        return documents, [*errors, ManifestError(source, len(bodies) + 1, None, None, "", reason)]
    return _documents(bodies, source)


def _yaml_reason(error: yaml.YAMLError) -> str:
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        problem = error.problem or "syntax error"
        if error.context:
            # The context mark says where the unfinished construct began.
            start = error.context_mark
            where = f" started at line {start.line + 1}" if start is not None else ""
            problem = f"{error.context}{where}, {problem}"
        return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return "invalid YAML: " + " ".join(str(error).split())


def _describe(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"a number ({value!r})"
    return names.get(type(value), type(value).__name__)


# ---------------------------------------------------------- workflow rules


def validate_workflow(
    workflow: Workflow, is_known_type: Callable[[str], bool] | None = None
) -> list[tuple[str, str]]:
    """Return (field path, reason) for every cross-field problem of a Workflow."""
    spec = workflow.spec
    problems: list[tuple[str, str]] = []
    outside = flow.first_indexes(spec.finally_steps)
    steps = flow.step_graph(spec.steps, problems, outside=outside, final=False)
    signals = [signal.name for signal in spec.signals]
    problems += _step_problems(steps, is_known_type, signals)
    problems += saga_problems(spec.steps, steps.index, steps.upstream, is_known_type)
    finals = flow.step_graph(spec.finally_steps, problems, outside=steps.index, final=True)
    problems += _step_problems(finals, is_known_type, signals)
    problems += flow.signal_problems(spec.signals)
    problems += _template_problems(spec.output, "spec.output")
    for at, names in expressions.template_references(spec.output, "spec.output"):
        problems += [(at, f"unknown step '{n}'") for n in sorted(names) if n not in steps.index]
    problems += flow.variable_problems(spec.output, "spec.output", ())
    return problems


def _template_problems(value: Any, path: str) -> list[tuple[str, str]]:
    return [(error.path, error.reason) for error in expressions.check_templates(value, path)]


def _step_problems(
    graph: flow.StepGraph, is_known_type: Callable[[str], bool] | None, signals: Sequence[str]
) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for i, step in enumerate(graph.steps):
        base = f"{graph.base}[{i}]"
        problems += _template_problems(step.input, f"{base}.input")
        problems += flow.reference_problems(step.input, f"{base}.input", step.name, graph)
        problems += _type_problems(step, base, is_known_type, signals)
        problems += flow.step_problems(step, base, graph)
    return problems


def _type_problems(
    step: StepSpec,
    base: str,
    is_known_type: Callable[[str], bool] | None,
    signals: Sequence[str],
) -> list[tuple[str, str]]:
    if step.type is None:
        return []  # a child workflow (`workflowRef`), checked with the other step rules
    if step.type == WAIT:
        return _wait_problems(step.input, f"{base}.input")
    if step.type == FAIL:
        return _fail_problems(step.input, f"{base}.input")
    if step.type == WAIT_SIGNAL:
        return _signal_wait_problems(step.input, f"{base}.input", signals)
    if step.type in BUILTIN_TYPES or is_known_type is None or is_known_type(step.type):
        return []
    reason = f"no runner registered for step type '{step.type}' and it is not built in"
    return [(f"{base}.type", reason)]


def _wait_problems(step_input: dict[str, Any] | None, path: str) -> list[tuple[str, str]]:
    at = f"{path}.duration"
    if not step_input or "duration" not in step_input:
        return [(at, "sagaflow.wait needs a duration, e.g. 30s")]
    return _duration_problems(step_input["duration"], at)


def _duration_problems(duration: Any, at: str) -> list[tuple[str, str]]:
    if not isinstance(duration, str):
        return [(at, f"must be a duration string such as 30s, got {_describe(duration)}")]
    if expressions.OPEN in duration:
        return []  # a template: its value is only known when the step runs
    try:
        parse_duration(duration)
    except ValueError as error:
        return [(at, str(error))]
    return []


def _signal_wait_problems(
    step_input: dict[str, Any] | None, path: str, signals: Sequence[str]
) -> list[tuple[str, str]]:
    """`signal` names a declared signal (a template is checked when the step runs)."""
    step_input = step_input or {}
    at, name = f"{path}.signal", step_input.get("signal")
    declared = f"declared: {', '.join(signals)}" if signals else "spec.signals declares none"
    problems = []
    if name is None:
        problems.append((at, f"sagaflow.waitForSignal needs the signal to wait for ({declared})"))
    elif not isinstance(name, str):
        problems.append((at, f"must be a signal name, got {_describe(name)}"))
    elif not signals:
        problems.append((at, "spec.signals declares no signal to wait for"))
    elif expressions.OPEN not in name and name not in signals:
        problems.append((at, f"unknown signal '{name}' ({declared})"))
    if step_input.get("timeout") is not None:  # null: wait for as long as it takes
        problems += _duration_problems(step_input["timeout"], f"{path}.timeout")
    return problems


def _fail_problems(step_input: dict[str, Any] | None, path: str) -> list[tuple[str, str]]:
    return [
        (f"{path}.{key}", f"must be a string, got {_describe(step_input[key])}")
        for key in ("type", "message")
        if step_input and key in step_input and not isinstance(step_input[key], str)
    ]


# ------------------------------------------------------------------ documents


@dataclass
class _Checked:
    """Per-document working state while validating a batch."""

    document: Document
    kind: str | None
    name: str | None
    namespace: str
    model: Workflow | Execution | Schedule | Trigger | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)


def validate_documents(
    documents: Sequence[Document],
    is_known_type: Callable[[str], bool] | None = None,
    existing_workflows: Collection[tuple[str, str]] = (),
) -> ValidationResult:
    """Validate every document and the rules across them; collect all problems.

    `existing_workflows` holds (namespace, name) of Workflows already known to
    the caller (e.g. stored earlier), which Executions and workflowRef steps may
    reference. A workflowRef naming a Workflow neither among the documents nor
    known is reported when the set is meant to be complete: it holds an Execution
    (whose Workflow must be there too) or `existing_workflows` was given. A single
    Workflow applied alone may call one stored earlier. Cycles among the Workflows
    given are always reported.
    """
    checked = [_check_document(document, is_known_type) for document in documents]
    _duplicate_problems(checked)
    _workflow_ref_problems(checked, existing_workflows)
    result = ValidationResult()
    for item in checked:
        doc = item.document
        result.errors += [
            ManifestError(doc.source, doc.index, item.kind, item.name, at, reason)
            for at, reason in item.problems
        ]
        if item.problems:
            continue
        if isinstance(item.model, Workflow):
            result.workflows.append((doc, item.model))
        elif isinstance(item.model, Execution):
            result.executions.append((doc, item.model))
        elif isinstance(item.model, Schedule):
            result.schedules.append((doc, item.model))
        elif isinstance(item.model, Trigger):
            result.triggers.append((doc, item.model))
    return result


def _check_document(document: Document, is_known_type: Callable[[str], bool] | None) -> _Checked:
    body = document.body
    kind, api_version = body.get("kind"), body.get("apiVersion")
    metadata = body.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    name, namespace = metadata.get("name"), metadata.get("namespace")
    item = _Checked(
        document,
        kind if isinstance(kind, str) else None,
        name if isinstance(name, str) else None,
        namespace if isinstance(namespace, str) and namespace else "default",
    )
    if api_version != API_VERSION:
        item.problems.append(
            ("apiVersion", f"unsupported apiVersion {api_version!r}; accepted: {API_VERSION}")
        )
    if not isinstance(kind, str) or kind not in _MODELS:
        item.problems.append(("kind", f"unsupported kind {kind!r}; accepted: {', '.join(KINDS)}"))
        return item
    try:
        # by_name=False: snake_case keys such as `depends_on` are unknown fields, as a
        # Kubernetes API server would treat them, although the models accept them
        # from Python code.
        item.model = _MODELS[kind].model_validate(body, by_alias=True, by_name=False)
    except ValidationError as error:
        # The envelope problem was reported above in plainer words.
        item.problems += [p for p in _pydantic_problems(error) if p[0] != "apiVersion"]
        return item
    if isinstance(item.model, Workflow):
        item.problems += validate_workflow(item.model, is_known_type)
    # Values Postgres cannot store (YAML's .nan and .inf, "\0" in a string) would fail
    # at run time in a transaction; they are refused here, with their path.
    problem = unstorable(body.get("spec"), "spec")
    if problem is not None:
        at, _, reason = problem.partition(": ")
        item.problems.append((at, reason))
    return item


def _pydantic_problems(error: ValidationError) -> list[tuple[str, str]]:
    details = error.errors(include_url=False)
    locations = [detail["loc"] for detail in details]
    problems = []
    for detail in details:
        loc = detail["loc"]
        # A list whose items all failed also reports "too short"; the item errors
        # say what is wrong, the length complaint only misleads.
        if detail["type"] == "too_short" and any(
            len(other) > len(loc) and other[: len(loc)] == loc for other in locations
        ):
            continue
        path = functools.reduce(expressions.child_path, loc, "")
        problems.append((path, _pydantic_reason(detail)))
    return problems


def _pydantic_reason(detail: Any) -> str:
    kind, message, value = detail["type"], detail["msg"], detail.get("input")
    context = detail.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    if kind == "value_error" and "error" in context:
        return str(context["error"])
    if kind == "string_pattern_mismatch":
        message = _PATTERN_RULES.get(context.get("pattern", ""), message)
    for python, yaml_words in _YAML_WORDS:
        message = message.replace(python, yaml_words)
    message = _MODEL_INSTANCE.sub("", message)
    if isinstance(value, str | int | float | bool) or value is None:
        shown = repr(value)
        message += f", got {shown if len(shown) <= 60 else shown[:57] + '...'}"
    return str(message)


def _duplicate_problems(checked: list[_Checked]) -> None:
    first: dict[tuple[str, str, str], Document] = {}
    for item in checked:
        if item.kind not in _MODELS or item.name is None:
            continue
        key = (item.kind, item.namespace, item.name)
        if key in first:
            seen, resource = first[key], f"{item.kind} '{item.namespace}/{item.name}'"
            where = f"first defined in {seen.source} document {seen.index}"
            item.problems.append(("metadata.name", f"duplicate {resource}; {where}"))
        else:
            first[key] = item.document


def _workflow_ref_problems(
    checked: list[_Checked], existing_workflows: Collection[tuple[str, str]]
) -> None:
    # Workflows count as defined even when invalid, so an Execution is not blamed
    # for a problem already reported on its Workflow.
    known = set(existing_workflows) | {
        (item.namespace, item.name) for item in checked if item.kind == "Workflow" and item.name
    }
    valid = {
        (item.namespace, item.name): item.model
        for item in checked
        if isinstance(item.model, Workflow) and not item.problems
    }
    for item in checked:
        if isinstance(item.model, Schedule | Trigger):
            ref = item.model.spec.workflow_ref.name
            if known and (item.namespace, ref) not in known:  # unchecked alone: stored ones
                reason = f"unknown Workflow '{ref}' in namespace '{item.namespace}'"
                item.problems.append(("spec.workflowRef.name", reason))
        if not isinstance(item.model, Execution):
            continue
        ref = item.model.spec.workflow_ref.name
        if (item.namespace, ref) not in known:
            reason = f"unknown Workflow '{ref}' in namespace '{item.namespace}'"
            item.problems.append(("spec.workflowRef.name", reason))
        workflow = valid.get((item.namespace, ref))
        if workflow is not None:
            names = [s.name for s in workflow.spec.steps]
            item.problems += skip_compensation_problems(item.model.spec.skip_compensation, names)
    parents = [(item, item.model) for item in checked if isinstance(item.model, Workflow)]
    complete = bool(existing_workflows) or any(item.kind == "Execution" for item in checked)
    found = flow.child_workflow_problems([w for _, w in parents], known if complete else None)
    for (item, _), problems in zip(parents, found, strict=True):
        item.problems += problems
