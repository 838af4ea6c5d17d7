"""Loading the modules that define steps, by dotted name or by file path.

Importing a step module runs its `@step` decorators, which is all a runner needs
before it starts. A file path is imported under a name derived from its resolved
path, so loading the same file twice returns the same module (and does not
register its steps twice), while two files with the same stem do not collide.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType


class StepModuleNotFoundError(ModuleNotFoundError):
    """The spec names neither an importable module nor an existing .py file."""


def load_module(spec: str | os.PathLike[str]) -> ModuleType:
    """Import `spec`, a dotted module name (`shop.steps`) or a path to a .py file."""
    text = os.fspath(spec)
    if not text.strip():
        raise ValueError("step module spec is empty: give a dotted module name or a .py path")
    if text.endswith(".py") or os.sep in text or "/" in text:
        return _load_file(Path(text))
    return _load_dotted(text)


def _load_dotted(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        # Only translate "this module does not exist"; a missing dependency *inside*
        # the step module is the author's error and keeps its own message.
        missing = exc.name or ""
        if missing and (name == missing or name.startswith(missing + ".")):
            raise StepModuleNotFoundError(
                f"step module {name!r} not found: no module named {missing!r} "
                "(is its package installed or on PYTHONPATH?)",
                name=name,
            ) from exc
        raise


def _load_file(path: Path) -> ModuleType:
    resolved = path.expanduser().resolve()
    if resolved.suffix != ".py" or not resolved.is_file():
        raise StepModuleNotFoundError(
            f"step module file {os.fspath(path)!r} not found (expected an existing .py file)",
            name=os.fspath(path),
        )
    digest = hashlib.sha256(os.fsencode(resolved)).hexdigest()[:12]
    stem = "".join(c if c.isalnum() else "_" for c in resolved.stem)
    module_name = f"_sagaflow_steps_{stem}_{digest}"
    cached = sys.modules.get(module_name)
    if cached is not None:
        return cached
    # Like `python file.py`: sibling helper modules of the step file are importable.
    directory = str(resolved.parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    if spec is None or spec.loader is None:
        raise StepModuleNotFoundError(
            f"step module file {os.fspath(path)!r} cannot be imported", name=os.fspath(path)
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        # A half-imported module must not be returned from the cache next time.
        sys.modules.pop(module_name, None)
        raise
    return module
