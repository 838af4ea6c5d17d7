"""Duration strings used by manifests (`500ms`, `30s`, `5m`, `1h`, `1h30m`).

Durations are parsed once, when a definition is compiled, into float seconds so
the engine never handles strings.
"""

from __future__ import annotations

import re

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
DURATION_PATTERN = r"^(\d+(\.\d+)?(ms|s|m|h|d))+$"
_WHOLE = re.compile(DURATION_PATTERN)


def parse_duration(text: str) -> float:
    """Return seconds for a duration string; raise ValueError naming the accepted forms."""
    if not isinstance(text, str) or not _WHOLE.match(text):
        raise ValueError(
            f"invalid duration {text!r}: use a number and a unit "
            "(ms, s, m, h, d), e.g. 500ms, 30s, 1h30m"
        )
    return sum(float(num) * _UNIT_SECONDS[unit] for num, unit in _PART.findall(text))
