"""`python -m sagaflow.local.crdgen [REPO_ROOT]`: write the generated CRDs to `crds/`
and to the Helm chart's `charts/sagaflow/crds/`, which ships the same files.

The CRDs themselves are built by the pure `sagaflow.core.crds`; this module owns only
the file writing, which the core may not do. REPO_ROOT defaults to the current
directory. Run it after any change to `sagaflow.core.manifests` or
`sagaflow.core.trigger_specs`; the drift test in `tests/core/test_crds.py` fails until
the files match.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sagaflow.core.crds import render_yaml

TARGETS = ("crds", "charts/sagaflow/crds")


def write_crds(repo_root: Path) -> list[Path]:
    """Write every generated CRD into each of TARGETS under `repo_root`; return the paths."""
    written = []
    for folder in TARGETS:
        target = repo_root / folder
        target.mkdir(parents=True, exist_ok=True)
        for name, text in render_yaml().items():
            path = target / name
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0]) if args else Path.cwd()
    for path in write_crds(root):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
