"""Authentication: JWTs (HS256 secret or RS256/ES256 public key) and API keys.

Accepted ``Authorization`` forms:

- ``<jwt>`` (the bare token, as seed 001 shows) or ``Bearer <jwt>``;
- ``Api-Key <key>`` (seed 002); keys are stored as SHA-256 hashes in the settings.

Tokens must carry ``exp``; ``aud``/``iss`` are checked when configured; the
algorithm must be one the settings allow *and* match the key kind, so neither
``alg: none`` nor HS256-signed-with-the-public-key (algorithm confusion) passes.

A request without ``Authorization`` to a route that admits it (the model-serving
routes) is the anonymous principal, with ``auth.anonymous_scopes`` (none by
default: refused as ever), no group and no project. Credentials that are sent are
always checked: wrong ones are refused, never taken as anonymous.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import jwt

from dicom_node.config import ApiKeySettings, AuthSettings

_SYMMETRIC = frozenset({"HS256"})
_ASYMMETRIC = frozenset({"RS256", "ES256"})
DEFAULT_SCOPES = frozenset({"infer", "read"})
_VERIFIED_MAX = 4096  # tokens whose verification is remembered (a RIS uses one for hours)


class AuthFailure(StrEnum):
    """Why a request was refused; the values are seed 001's messages."""

    MISSING = "Token missing"
    EXPIRED = "Token expired"
    INVALID = "Invalid token"
    FORBIDDEN = "Insufficient scope"


class AuthError(Exception):
    def __init__(self, failure: AuthFailure, detail: str = "") -> None:
        super().__init__(detail or failure.value)
        self.failure = failure
        self.detail = detail or failure.value

    @property
    def status(self) -> int:
        return 403 if self.failure is AuthFailure.FORBIDDEN else 401


ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a token's subject or an API key's name, with scopes, group and the
    projects it may use (None: every project)."""

    subject: str
    kind: str  # "jwt", "api_key" or "anonymous"
    scopes: frozenset[str]
    group: str | None = None
    projects: frozenset[str | int] | None = None

    def may_use_project(self, project_id: int, name: str) -> bool:
        """Whether the caller may list the project's sources and run models on them (seed
        002's "Model Run" permission): listed by name or by integer id, or no list."""
        return self.projects is None or name in self.projects or project_id in self.projects

    def require(self, scope: str | tuple[str, ...]) -> None:
        """Refuse (403) unless the caller holds ``scope`` (any one of a tuple) or admin."""
        wanted = (scope,) if isinstance(scope, str) else scope
        if not self.scopes.intersection(wanted) and "admin" not in self.scopes:
            names = " or ".join(repr(w) for w in wanted)
            raise AuthError(AuthFailure.FORBIDDEN, f"this route needs the {names} scope")

    @property
    def owner(self) -> str:
        """A stable name for what this caller owns (jobs, transactionIDs)."""
        return f"{self.kind}:{self.subject}"


def hash_api_key(key: str) -> str:
    """The SHA-256 hex digest that ``auth.api_keys[].key_sha256`` stores."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class Authenticator:
    """Checks ``Authorization`` headers against the configured secret, key and API keys."""

    def __init__(
        self,
        settings: AuthSettings,
        secret: bytes | None,
        public_key_file: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.secret = secret
        self.public_key = public_key_file.read_text() if public_key_file else None
        self._keys: list[ApiKeySettings] = list(settings.api_keys)
        self._clock = clock
        # token -> (principal, nbf, exp) of a token that verified. The signature and the
        # claims of a given token string never change, only the time checks can turn, so
        # a known token is re-checked against the clock alone: PyJWT's parsing and
        # signature check were ~5 % of a /predictions request's CPU.
        self._verified: dict[str, tuple[Principal, float, float]] = {}
        self.anonymous = Principal(ANONYMOUS, ANONYMOUS, frozenset(settings.anonymous_scopes),
                                   group=None, projects=frozenset()) \
            if settings.anonymous_scopes else None

    def authenticate(self, header: str | None, *, anonymous: bool = False) -> Principal:
        """The caller the ``Authorization`` header names. Without one: the anonymous
        principal where ``anonymous`` (the route admits it) and the settings give it
        scopes, else AuthError MISSING."""
        if header is not None and not header.isascii():
            # aiohttp hands undecodable bytes on as surrogates: the key's hash and the
            # token's parse raised UnicodeEncodeError, a 500 with a traceback per request
            raise AuthError(AuthFailure.INVALID, "the Authorization header is not ASCII")
        if header is None or not header.strip():
            if anonymous and self.anonymous is not None:
                return self.anonymous
            raise AuthError(AuthFailure.MISSING)
        value = header.strip()
        scheme, _, rest = value.partition(" ")
        if scheme.lower() == "api-key":
            return self._api_key(rest.strip())
        if scheme.lower() == "bearer":
            value = rest.strip()
        if not value:
            raise AuthError(AuthFailure.MISSING)
        return self._jwt(value)

    def _api_key(self, key: str) -> Principal:
        if not key:
            raise AuthError(AuthFailure.MISSING)
        digest = hash_api_key(key)
        for entry in self._keys:  # compare every entry: no early exit to time
            if hmac.compare_digest(digest, entry.key_sha256):
                return Principal(entry.name, "api_key", frozenset(entry.scopes), entry.group,
                                 None if entry.projects is None else frozenset(entry.projects))
        raise AuthError(AuthFailure.INVALID, "unknown API key")

    def _jwt(self, token: str) -> Principal:
        known = self._verified.get(token)
        if known is not None:
            principal, not_before, expires = known
            now = self._clock()
            if not_before <= now < expires:  # PyJWT's own tests, without leeway
                return principal
            self._verified.pop(token, None)  # expired (or not yet valid): verify afresh
        principal, not_before, expires = self._verify_jwt(token)
        if len(self._verified) >= _VERIFIED_MAX:
            self._verified.pop(next(iter(self._verified)), None)  # the oldest
        self._verified[token] = (principal, not_before, expires)
        return principal

    def _verify_jwt(self, token: str) -> tuple[Principal, float, float]:
        allowed = set(self.settings.algorithms)
        try:
            alg = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError:
            raise AuthError(AuthFailure.INVALID) from None
        key: str | bytes | None
        if alg in _SYMMETRIC & allowed:
            key = self.secret
        elif alg in _ASYMMETRIC & allowed:
            key = self.public_key
        else:
            raise AuthError(AuthFailure.INVALID, f"algorithm {alg!r} is not accepted")
        if key is None:
            raise AuthError(AuthFailure.INVALID, f"no key configured for {alg}")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.settings.audience,
                issuer=self.settings.issuer,
                options={"require": ["exp"], "verify_aud": self.settings.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(AuthFailure.EXPIRED) from None
        except jwt.PyJWTError as exc:
            raise AuthError(AuthFailure.INVALID, str(exc)) from None
        principal = Principal(
            subject=str(claims.get("sub", "anonymous")),
            kind="jwt",
            scopes=_scopes(claims),
            group=claims.get("group"),
            projects=_projects(claims),
        )
        nbf = claims.get("nbf")
        return (principal, float(nbf) if isinstance(nbf, (int, float)) else float("-inf"),
                float(claims["exp"]))


def _scopes(claims: dict[str, object]) -> frozenset[str]:
    raw = claims.get("scope", claims.get("scopes"))
    if isinstance(raw, str):
        return frozenset(raw.split())
    if isinstance(raw, list):
        return frozenset(str(s) for s in raw)
    return DEFAULT_SCOPES


def _projects(claims: dict[str, object]) -> frozenset[str | int] | None:
    """The ``projects`` claim (names or integer ids, as ``auth.api_keys[].projects``);
    None without one. Anything else is refused rather than read as "every project"."""
    if "projects" not in claims:
        return None
    raw = claims["projects"]
    if raw is None:  # an identity provider's "no assignment": never "every project"
        raise AuthError(AuthFailure.INVALID, "the token's projects claim is null; give a "
                        "list of project names or ids, or no claim for every project")
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(
            isinstance(p, str | int) and not isinstance(p, bool) for p in raw):
        raise AuthError(AuthFailure.INVALID,
                        "the token's projects claim must be a list of project names or ids")
    return frozenset(raw)
