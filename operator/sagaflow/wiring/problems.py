"""Input or configuration that cannot work: every problem, named, and nothing started.

Raised by the wiring (a value the Azure SDK refuses) and by local mode's manifest
loading; the commands print each problem on its own line and exit 2.
"""

from __future__ import annotations

from collections.abc import Sequence


class InvalidInputError(Exception):
    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)
