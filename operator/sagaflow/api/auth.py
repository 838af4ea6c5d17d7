"""Who may call the HTTP API, and on which namespaces.

Every API route names what it does as a Kubernetes verb on `executions.sagaflow.io`:
a start is `create`, a read is `get`, a signal or a control request is `patch`. An
`Authorizer` turns the request's bearer token, that verb and the namespace into a
`Principal` (whose name the start path records as the run's source), or refuses
with 401 (no token, or one nobody knows) or 403 (a known caller, not allowed here).

Two implementations live here, for `sagaflow server`:

- `TokensFile`: a YAML file (`SAGAFLOW_API_TOKENS_FILE`) of named tokens, each given
  as itself or as its SHA-256, and the namespaces it may use. Read once, at start-up:
  a bad file is a `TokensFileError` naming the file and the field.
- `LoopbackOnly`: no auth at all, which is only safe when nothing but this machine
  can connect; `server.bind_host` holds the API to a loopback address then.

In a cluster the operator uses `kube.auth.KubeAuthorizer` (TokenReview and
SubjectAccessReview) instead; this module imports nothing of Kubernetes.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml

from sagaflow.api.contract import ApiError

Verb = Literal["create", "get", "patch"]
# What an Authorizer is asked about: the resource a Kubernetes RBAC rule names.
GROUP = "sagaflow.io"
RESOURCE = "executions"

_BEARER = re.compile(r"^[Bb]earer +(\S+) *$")
_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:\-]{0,252}$")
_NAMESPACE = re.compile(r"^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?|\*)$")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a token's name, a Kubernetes user, or `anonymous` on loopback."""

    name: str


class Authorizer(Protocol):
    async def authorize(self, token: str | None, verb: Verb, namespace: str) -> Principal:
        """The caller, or ApiError 401 (unauthenticated) / 403 (not allowed)."""
        ...


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "Unauthorized", message)


def forbidden(message: str) -> ApiError:
    return ApiError(403, "Forbidden", message)


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None without a header.
    Any other form of the header is a 401: a caller sending it meant to authenticate."""
    if header is None:
        return None
    found = _BEARER.match(header)
    if found is None:
        raise unauthorized("the Authorization header must read 'Bearer <token>'")
    return found.group(1)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokensFileError(ValueError):
    """The tokens file cannot be used; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str
    digest: bytes  # SHA-256 of the token: the file may hold only this
    namespaces: frozenset[str]  # "*": every namespace

    def allows(self, namespace: str) -> bool:
        return "*" in self.namespaces or namespace in self.namespaces


class TokensFile:
    """Bearer tokens from a YAML file::

        tokens:
          - name: ci
            sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
            namespaces: [team-a]
          - name: admin
            token: s3cret
            namespaces: ["*"]

    Every token may use every verb in its namespaces. Tokens are compared by their
    SHA-256 in constant time, against every entry, so timing tells nothing of them.
    """

    def __init__(self, entries: Sequence[_Entry], source: str = "tokens") -> None:
        self._entries = tuple(entries)
        self.source = source

    @classmethod
    def load(cls, path: Path) -> TokensFile:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise TokensFileError(f"API tokens file {path}: cannot read: {reason}") from None
        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise TokensFileError(f"API tokens file {path}: not YAML: {exc}") from None
        return cls(_entries(document, str(path)), str(path))

    @property
    def names(self) -> list[str]:
        return [e.name for e in self._entries]

    async def authorize(self, token: str | None, verb: Verb, namespace: str) -> Principal:
        if token is None:
            raise unauthorized(
                "this API needs a bearer token: send 'Authorization: Bearer <token>'"
            )
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for entry in self._entries:  # no early exit: every entry costs the same
            if hmac.compare_digest(entry.digest, digest):
                found = entry
        if found is None:
            raise unauthorized("the bearer token is not known to this server")
        if not found.allows(namespace):
            raise forbidden(
                f"token {found.name!r} may not {verb} {RESOURCE}.{GROUP} in namespace {namespace!r}"
            )
        return Principal(found.name)


def _entries(document: Any, path: str) -> list[_Entry]:
    def bad(field: str, message: str) -> TokensFileError:
        return TokensFileError(f"API tokens file {path}: {field}: {message}")

    if not isinstance(document, dict) or set(document) != {"tokens"}:
        raise bad("tokens", "the file must be a mapping with one key, 'tokens'")
    items = document["tokens"]
    if not isinstance(items, list) or not items:
        raise bad("tokens", "a non-empty list of {name, token or sha256, namespaces}")
    entries: list[_Entry] = []
    seen_names: set[str] = set()
    seen_digests: set[bytes] = set()
    for i, item in enumerate(items):
        at = f"tokens[{i}]"
        if not isinstance(item, dict):
            raise bad(at, "a mapping of name, token or sha256, namespaces")
        unknown = sorted(set(map(str, item)) - {"name", "token", "sha256", "namespaces"})
        if unknown:
            raise bad(f"{at}.{unknown[0]}", "unknown field (name, token, sha256, namespaces)")
        name = item.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise bad(
                f"{at}.name", "a name of letters, digits and . _ @ : - (it names runs' source)"
            )
        if name in seen_names:
            raise bad(f"{at}.name", f"{name!r} appears twice")
        seen_names.add(name)
        digest = _digest_of(item, at, bad)
        if digest in seen_digests:
            raise bad(at, "the same token appears twice")
        seen_digests.add(digest)
        namespaces = item.get("namespaces")
        if not isinstance(namespaces, list) or not namespaces:
            raise bad(f"{at}.namespaces", 'a non-empty list of namespaces, or ["*"] for all')
        for j, ns in enumerate(namespaces):
            if not isinstance(ns, str) or not _NAMESPACE.match(ns):
                raise bad(f"{at}.namespaces[{j}]", f"{ns!r} is not a namespace name or '*'")
        entries.append(_Entry(name, digest, frozenset(namespaces)))
    return entries


def _digest_of(item: dict[str, Any], at: str, bad: Any) -> bytes:
    token, sha = item.get("token"), item.get("sha256")
    if (token is None) == (sha is None):
        raise bad(at, "give exactly one of token or sha256")
    if token is not None:
        if not isinstance(token, str) or len(token) < 16 or not token.isprintable():
            raise bad(f"{at}.token", "a string of at least 16 printable characters")
        if any(c.isspace() for c in token):
            raise bad(f"{at}.token", "a token cannot hold spaces")
        return hashlib.sha256(token.encode()).digest()
    if not isinstance(sha, str) or not _HEX.match(sha):
        raise bad(f"{at}.sha256", "64 hex digits: the SHA-256 of the token")
    return bytes.fromhex(sha)


class LoopbackOnly:
    """No auth: every caller is `anonymous`. Only for an API bound to loopback, which
    `server.bind_host` enforces (and warns about)."""

    async def authorize(self, token: str | None, verb: Verb, namespace: str) -> Principal:
        return Principal("anonymous")


def file_or_loopback(tokens_file: Path | None) -> TokensFile | LoopbackOnly:
    """What `sagaflow server` uses: the tokens file if one is set, else no auth."""
    return LoopbackOnly() if tokens_file is None else TokensFile.load(tokens_file)


__all__ = [
    "GROUP",
    "RESOURCE",
    "Authorizer",
    "LoopbackOnly",
    "Principal",
    "TokensFile",
    "TokensFileError",
    "Verb",
    "bearer_token",
    "file_or_loopback",
    "forbidden",
    "token_digest",
    "unauthorized",
]
