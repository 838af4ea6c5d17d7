"""Read and validate the manifest files given to `sagaflow run`.

Everything is checked before anything starts: a bad file yields every problem,
each naming file, document, field path and reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from sagaflow.core.validation import (
    Document,
    ManifestError,
    ValidationResult,
    parse_documents,
    validate_documents,
)
from sagaflow.wiring.problems import InvalidInputError

__all__ = ["InvalidInputError", "load_manifests"]

_SERVED = "served by `sagaflow server` (or the operator), which keeps going; not by `sagaflow run`"


def load_manifests(paths: Sequence[Path], is_known_type: Callable[[str], bool]) -> ValidationResult:
    documents: list[Document] = []
    errors: list[ManifestError] = []
    problems: list[str] = []
    for path in _expand(paths):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(
                f"{path}: cannot read: {exc.strerror if isinstance(exc, OSError) else exc}"
            )
            continue
        docs, errs = parse_documents(text, str(path))
        documents.extend(docs)
        errors.extend(errs)
    result = validate_documents(documents, is_known_type)
    problems.extend(str(e) for e in [*errors, *result.errors])
    # They start runs over time: `sagaflow run` ends when its runs do.
    problems.extend(
        str(ManifestError(doc.source, doc.index, kind, model.metadata.name, "kind", _SERVED))
        for kind, found in (("Schedule", result.schedules), ("Trigger", result.triggers))
        for doc, model in found
    )
    if not problems and not result.executions:
        problems.append("no Execution found in the given files: nothing to run")
    if problems:
        raise InvalidInputError(problems)
    return result


def _expand(paths: Sequence[Path]) -> list[Path]:
    """Files as given; a directory stands for its *.yaml / *.yml files, sorted."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out.extend(sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml")))
        else:
            out.append(path)
    return out
