"""JWT verification of the calling EHR (CDS Hooks 2.0 "Trusting CDS Clients").

Every call to a service that requires authentication carries ``Authorization: Bearer <JWT>``,
signed by the EHR (the "CDS client") with a private key whose public half we hold or may fetch.
Checks run in the order of the cds-hooks.org best practices, cheapest and network-free first:

    header sanity (no jwk/x5u/x5c/crit/b64, alg, kid, typ) -> iss on our list -> alg allowed for that client -> aud
    -> exp / iat / nbf / lifetime -> jti present -> tenant -> signature (key by kid) -> jti unseen

An unknown ``iss`` or a ``jku`` that is not on the client's list never causes an outbound request.
Failures raise :class:`AuthError`, whose ``reason`` is for the log only; the HTTP answer is a bare 401.
Nothing here logs a token or a claim other than ``iss``, ``tenant`` and a short hash of ``jti``.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.to_thread
import httpx
import jwt
import yaml
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from jwt.api_jws import PyJWS

from cds_service.http_body import read_capped
from cds_service.settings import SettingsError
from cds_service.store import StoreError

log = logging.getLogger("cds_service.auth")

MAX_TOKEN_CHARS = 8192  # a CDS Hooks JWT is well under 2 KB
LIFETIME_ROUNDING_S = 1  # exp - iat may exceed the configured lifetime by this much (NumericDates rounded apart)
DEFAULT_ALGORITHMS = ("ES384", "RS384")  # the two the spec recommends
# alg -> (JWK kty, EC curve or None). Only asymmetric signature algorithms can ever be configured.
ALGORITHM_KEYS: dict[str, tuple[str, str | None]] = {
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS384": ("RSA", None),
}
MIN_RSA_BITS = 2048
# Header parameters a CDS Hooks JWT never needs (RFC 7515 4.1): a key or certificate carried or pointed
# to by the token itself (keys come from the clients file or an allow-listed jku only, so refusing these
# keeps any later code from trusting them), "crit" (CDS Hooks defines no extension; PyJWT would accept
# "b64") and "b64" (RFC 7797 unencoded payloads).
REFUSED_HEADER_PARAMETERS = ("jwk", "x5u", "x5c", "crit", "b64")

JWKS_TTL_S = 3600.0  # a fetched key set is used this long before it is fetched again
JWKS_REFETCH_INTERVAL_S = 60.0  # at most one fetch per URL in this interval (unknown kid, failures)
JWKS_TIMEOUT_S = 3.0
JWKS_MAX_BYTES = 100_000

REPLAY_CACHE_MAX_ENTRIES = 100_000

# JWS compact serialization (RFC 7515 3.1, 7.1): three base64url parts without padding. PyJWT also takes
# '=' padding, so one signed token could be sent under several spellings; only this one is accepted.
# (An empty signature part is let through to be refused with the alg or the signature check.)
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


class AuthError(Exception):
    """The request is not authenticated. ``reason`` goes to the log, never to the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class AuthenticatedClient:
    issuer: str
    tenant: str | None
    fhir_servers: tuple[str, ...]  # the client's own FHIR servers (join the FHIR allow-list for its requests)
    jti: str


@dataclass(frozen=True)
class VerificationKey:
    """One public key from a JWK Set, usable for signatures."""

    kid: str
    kty: str  # "EC" or "RSA"
    crv: str | None  # EC curve name
    alg: str | None  # the JWK's own "alg", when it states one
    key: Any  # a cryptography public key object

    def fits(self, alg: str) -> bool:
        kty, crv = ALGORITHM_KEYS[alg]
        return self.kty == kty and (crv is None or self.crv == crv) and self.alg in (None, alg)


@dataclass(frozen=True)
class ClientConfig:
    """One trusted EHR, from the clients file."""

    issuer: str
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    fhir_servers: tuple[str, ...] = ()
    tenants: tuple[str, ...] | None = None  # None: any tenant (or none)
    jwks_url: str | None = None
    jku_allowlist: tuple[str, ...] = ()
    max_lifetime_s: int | None = None  # overrides CDS_JWT_MAX_LIFETIME for this client
    keys: Mapping[str, VerificationKey] = field(default_factory=dict, compare=False, repr=False)  # inline / file JWKS


# --------------------------------------------------------------------------------------------
# JWK Sets


def parse_jwks(data: Any) -> dict[str, VerificationKey]:
    """The signature keys of a JWK Set, by kid. Keys that are not usable for signatures are skipped."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError('a JWK Set is an object with a "keys" array')
    keys: dict[str, VerificationKey] = {}
    for jwk in data["keys"]:
        key = _parse_jwk(jwk)
        if key is not None and key.kid not in keys:
            keys[key.kid] = key
    return keys


def _parse_jwk(jwk: Any) -> VerificationKey | None:
    if not isinstance(jwk, dict):
        return None
    kid, kty, alg = jwk.get("kid"), jwk.get("kty"), jwk.get("alg")
    if not isinstance(kid, str) or not kid or kty not in ("EC", "RSA"):
        return None
    if jwk.get("use", "sig") != "sig":
        return None
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        return None
    if alg is not None and alg not in ALGORITHM_KEYS:
        return None
    public = {name: value for name, value in jwk.items() if name not in ("d", "p", "q", "dp", "dq", "qi", "oth")}
    try:
        key = ECAlgorithm.from_jwk(public) if kty == "EC" else RSAAlgorithm.from_jwk(public)
    except (jwt.InvalidKeyError, ValueError, TypeError, KeyError):
        return None
    if kty == "RSA" and key.key_size < MIN_RSA_BITS:
        return None
    return VerificationKey(kid=kid, kty=kty, crv=jwk.get("crv") if kty == "EC" else None, alg=alg, key=key)


@dataclass
class _FetchedKeys:
    keys: dict[str, VerificationKey]
    fetched_at: float  # last successful fetch (0: never)
    attempted_at: float  # last fetch attempt, successful or not
    failed: bool = False  # the last attempt failed


class JwksFetcher:
    """Fetches JWK Sets over HTTPS: no redirects, short timeout, size cap, cached, refetch rate-limited."""

    def __init__(self, client: httpx.AsyncClient, clock: Callable[[], float]) -> None:
        self._client = client
        self._clock = clock
        self._cache: dict[str, _FetchedKeys] = {}
        self._locks: dict[str, anyio.Lock] = {}  # one per URL; URLs come from the configuration only

    async def key(self, url: str, kid: str) -> VerificationKey:
        async with self._locks.setdefault(url, anyio.Lock()):
            entry = self._cache.get(url)
            now = self._clock()
            fresh = entry is not None and now - entry.fetched_at < JWKS_TTL_S
            if fresh and kid in entry.keys:
                return entry.keys[kid]
            if entry is None or now - entry.attempted_at >= JWKS_REFETCH_INTERVAL_S:
                entry = await self._refresh(url, entry, now)
            if kid in entry.keys:
                return entry.keys[kid]  # possibly stale when the URL is down: keys are kept, not dropped
            raise AuthError("JWKS unavailable" if entry.failed else "unknown kid")

    async def _refresh(self, url: str, entry: _FetchedKeys | None, now: float) -> _FetchedKeys:
        if entry is None:
            entry = _FetchedKeys(keys={}, fetched_at=0.0, attempted_at=now)
        entry.attempted_at = now
        self._cache[url] = entry
        try:
            with anyio.fail_after(JWKS_TIMEOUT_S):
                entry.keys = parse_jwks(json.loads(await self._download(url)))
            entry.fetched_at, entry.failed = now, False
        except (httpx.HTTPError, ValueError, TimeoutError) as exc:  # keep the keys we had, if any
            entry.failed = True
            log.warning("JWKS fetch failed for %s: %s", url, _one_line(str(exc) or type(exc).__name__))
        return entry

    async def _download(self, url: str) -> bytes:
        async with self._client.stream("GET", url) as response:
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code} (redirects are not followed)")
            body = await read_capped(response, JWKS_MAX_BYTES)
            if body is None:
                raise ValueError("JWK Set too large")
            return body


# --------------------------------------------------------------------------------------------
# Replay cache


class ReplayCache(Protocol):
    async def remember(self, key: str, expires_at: float) -> bool:
        """True: first time seen (now remembered until expires_at). False: a replay."""
        ...


class MemoryReplayCache:
    """In-process replay cache: entries expire, size is bounded (the soonest-expiring entry is dropped).

    Only tokens with a valid signature reach it, so only trusted clients can fill it. One process only:
    with several workers or replicas use :class:`StoreReplayCache`.
    """

    def __init__(self, max_entries: int = REPLAY_CACHE_MAX_ENTRIES, clock: Callable[[], float] = time.time) -> None:
        self._max_entries = max_entries
        self._clock = clock
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    async def remember(self, key: str, expires_at: float) -> bool:
        now = self._clock()
        while self._heap and self._heap[0][0] <= now:
            _, old = heapq.heappop(self._heap)
            self._expiry.pop(old, None)
        if key in self._expiry:
            return False
        if len(self._expiry) >= self._max_entries:
            _, dropped = heapq.heappop(self._heap)
            self._expiry.pop(dropped, None)
            log.warning("replay cache full (%d entries): dropped the entry closest to expiry", self._max_entries)
        self._expiry[key] = expires_at
        heapq.heappush(self._heap, (expires_at, key))
        return True


STORE_TIMEOUT_S = 5.0  # longest wait for the replay cache's database


class StoreReplayCache:
    """Replay cache shared by all workers and replicas, kept by the storage layer."""

    def __init__(self, store: Any) -> None:
        self._store = store

    async def remember(self, key: str, expires_at: float) -> bool:
        """Raises StoreError when the database is down or does not answer in time (the app answers 503)."""
        try:
            with anyio.fail_after(STORE_TIMEOUT_S):
                return bool(await anyio.to_thread.run_sync(self._store.remember_jti, key, expires_at, abandon_on_cancel=True))
        except TimeoutError:
            raise StoreError("the replay cache did not answer in time") from None


# --------------------------------------------------------------------------------------------
# The authenticator


class Authenticator:
    def __init__(
        self,
        settings: Any,
        replay_cache: ReplayCache | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        clients: Sequence[ClientConfig] | None = None,  # instead of settings.clients_file (tests, embedding)
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.required: bool = bool(settings.clients_file) or clients is not None
        if clients is not None:
            self.clients: tuple[ClientConfig, ...] = tuple(clients)
        else:
            self.clients = load_clients(settings.clients_file) if settings.clients_file else ()
        self._by_issuer = {client.issuer: client for client in self.clients}
        self._max_lifetime_s = settings.jwt_max_lifetime_s
        self._skew_s = settings.jwt_clock_skew_s
        self._clock = clock
        self._replay_cache = replay_cache if replay_cache is not None else MemoryReplayCache(clock=clock)
        self._http = httpx.AsyncClient(
            transport=transport,
            follow_redirects=False,
            timeout=JWKS_TIMEOUT_S,
            headers={"Accept": "application/json"},
        )
        self._jwks = JwksFetcher(self._http, clock)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def authenticate(self, audience_url: str, authorization: str | list[str] | None) -> AuthenticatedClient | None:
        """The verified caller; None in open mode (no clients configured: nothing is checked).

        ``audience_url`` is :func:`expected_audience` of the request; ``authorization`` the Authorization header,
        or every Authorization header of the request (two are ambiguous: a proxy may have checked the other one,
        so they are refused). Raises :class:`AuthError`.
        """
        if not self.required:
            return None
        seen: dict[str, Any] = {}
        try:
            if isinstance(authorization, list):
                if len(authorization) > 1:
                    raise AuthError("several Authorization headers")
                authorization = authorization[0] if authorization else None
            client = await self._verify(audience_url, authorization, seen)
        except AuthError as exc:
            log.warning("JWT refused: %s%s", exc.reason, _log_context(seen))
            raise
        log.debug("JWT accepted%s", _log_context(seen))
        return client

    async def _verify(self, audience_url: str, authorization: str | None, seen: dict[str, Any]) -> AuthenticatedClient:
        token = _bearer_token(authorization)
        header, claims = _unverified_parts(token)
        seen.update({name: claims.get(name) for name in ("iss", "tenant", "jti")})  # logged if strings

        if any(name in header for name in REFUSED_HEADER_PARAMETERS):
            raise AuthError("unsupported header parameter")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none" or alg.upper().startswith("HS"):
            raise AuthError("forbidden alg")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError("missing kid")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.upper() != "JWT"):
            raise AuthError("typ is not JWT")

        issuer = claims.get("iss")
        if not isinstance(issuer, str) or not issuer:
            raise AuthError("missing iss")
        client = self._by_issuer.get(issuer)
        if client is None:
            raise AuthError("unknown issuer")
        if alg not in client.algorithms or alg not in ALGORITHM_KEYS:
            raise AuthError("alg not allowed for this client")

        if "aud" not in claims:
            raise AuthError("missing aud")
        # CDS Hooks: aud is the endpoint called, a string or a one-element array. A token for several
        # audiences could be replayed to us by any of the others, so an array of more is refused. The
        # comparison is exact (RFC 7519 section 2: StringOrURI values are compared as case-sensitive
        # strings with no transformations or canonicalizations), a trailing slash included.
        audience = claims["aud"]
        if isinstance(audience, list) and len(audience) == 1:
            audience = audience[0]
        if not isinstance(audience, str) or audience != audience_url:
            raise AuthError("aud mismatch")

        self._check_times(claims, client)

        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise AuthError("missing jti")

        _optional_string(claims, "sub")  # not a CDS Hooks 2.0 claim (Epic sends its client id): ignored, but a string
        tenant = _optional_string(claims, "tenant")
        if client.tenants is not None and tenant not in client.tenants:
            raise AuthError("tenant not allowed")

        key = await self._find_key(client, header, kid)
        if not key.fits(alg):
            raise AuthError("key does not fit alg")
        try:
            PyJWS().decode_complete(token, key.key, algorithms=[alg])
        except jwt.InvalidTokenError:
            raise AuthError("bad signature") from None

        if not await self._replay_cache.remember(f"{issuer}|{jti}", claims["exp"] + self._skew_s):
            raise AuthError("replayed jti")
        return AuthenticatedClient(issuer=issuer, tenant=tenant, fhir_servers=client.fhir_servers, jti=jti)

    def _check_times(self, claims: dict[str, Any], client: ClientConfig) -> None:
        now, skew = self._clock(), self._skew_s
        exp = _time_claim(claims, "exp")
        if now > exp + skew:
            raise AuthError("expired")
        iat = _time_claim(claims, "iat")
        if iat > now + skew:
            raise AuthError("iat in the future")
        if exp < iat:
            raise AuthError("exp before iat")
        max_lifetime = client.max_lifetime_s if client.max_lifetime_s is not None else self._max_lifetime_s
        # exp and iat both come from the issuer's clock: the skew between its clock and ours does not lengthen
        # the lifetime. One second is allowed for an issuer that rounds the two NumericDates apart.
        if exp - iat > max_lifetime + LIFETIME_ROUNDING_S:
            raise AuthError("lifetime too long")
        nbf = claims.get("nbf")
        if "nbf" in claims and (not _is_time(nbf) or nbf > now + skew):
            raise AuthError("not yet valid (nbf)")

    async def _find_key(self, client: ClientConfig, header: dict[str, Any], kid: str) -> VerificationKey:
        jku = header.get("jku")
        if jku is not None and jku not in client.jku_allowlist:
            raise AuthError("jku not allowed")
        if kid in client.keys:
            return client.keys[kid]
        url = jku or client.jwks_url
        if url is None:
            raise AuthError("unknown kid")
        return await self._jwks.key(url, kid)


def _bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise AuthError("missing bearer token")
    if len(authorization) > MAX_TOKEN_CHARS:
        raise AuthError("token too large")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise AuthError("not a bearer token")
    return token


def _unverified_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims, before any signature check: used only to decide, never trusted alone."""
    if not _COMPACT_JWS.fullmatch(token):  # no padding, no '+' or '/', no blanks, exactly three parts
        raise AuthError("malformed token")
    try:
        PyJWS().decode_complete(token, options={"verify_signature": False})  # also refuses unknown "crit" and b64=false
    except (jwt.InvalidTokenError, ValueError, TypeError):
        raise AuthError("malformed token") from None
    header, claims, _ = token.split(".")
    return _json_object(header), _json_object(claims)


def _json_object(segment: str) -> dict[str, Any]:
    """A header or claims segment: base64url of a JSON object in UTF-8 (RFC 7515 and 7519), parsed here
    rather than by json.loads(bytes), which would also take UTF-16 or UTF-32. Nesting deeper than the
    parser's recursion limit is a malformed token, not a RecursionError (a 500).

    A member name twice, at any depth, is refused (RFC 7515 section 4, RFC 7519 section 4 allow either
    that or "the last one wins"; another parser that keeps the first would read another alg, aud or iss)."""
    try:
        text = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)).decode("utf-8")
        value = json.loads(text, object_pairs_hook=_object_without_duplicates)
    except _DuplicateMember:
        raise AuthError("duplicate JSON member") from None
    except (ValueError, RecursionError):  # binascii.Error and UnicodeDecodeError are ValueErrors
        raise AuthError("malformed token") from None
    if not isinstance(value, dict):
        raise AuthError("malformed token")
    return value


class _DuplicateMember(ValueError):
    pass


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for name, value in pairs:
        if name in obj:
            raise _DuplicateMember(name)
        obj[name] = value
    return obj


def _optional_string(claims: dict[str, Any], name: str) -> str | None:
    """An optional claim: absent, or a non-empty string (not null, a number, an object or "")."""
    if name not in claims:
        return None
    value = claims[name]
    if not isinstance(value, str):
        raise AuthError(f"{name} is not a string")
    if not value:
        raise AuthError(f"{name} is empty")
    return value


def _is_time(value: Any) -> bool:
    """A usable NumericDate: a finite JSON number (an integer too large for a float is not one)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # a 400-digit integer: math.isfinite cannot convert it
        return False


def _time_claim(claims: dict[str, Any], name: str) -> float:
    """A required NumericDate claim (exp, iat)."""
    value = claims.get(name)
    if value is None:
        raise AuthError(f"missing {name}")
    if not _is_time(value):
        raise AuthError(f"{name} is not a number")
    return value


def _one_line(text: str, limit: int = 120) -> str:
    return repr(text[:limit])


def _log_context(seen: dict[str, Any]) -> str:
    parts = []
    if isinstance(seen.get("iss"), str):
        parts.append(f"iss={_one_line(seen['iss'])}")
    if isinstance(seen.get("tenant"), str):
        parts.append(f"tenant={_one_line(seen['tenant'])}")
    if isinstance(seen.get("jti"), str):
        parts.append(f"jti#={hashlib.sha256(seen['jti'].encode()).hexdigest()[:12]}")
    return " (" + ", ".join(parts) + ")" if parts else ""


def expected_audience(settings: Any, request_url: str) -> str:
    """The URL being invoked as the client sees it: the JWT ``aud`` we require.

    Behind a proxy set CDS_PUBLIC_BASE_URL: the audience is that base plus the request path.
    Otherwise it is the request URL without query string or fragment.
    """
    parts = urlsplit(request_url)
    if settings.public_base_url:
        return settings.public_base_url.rstrip("/") + (parts.path or "/")
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


# --------------------------------------------------------------------------------------------
# Clients file

_CLIENT_FIELDS = {"issuer", "jwks", "jwks_file", "jwks_url", "jku_allowlist", "fhir_servers", "tenants", "algorithms", "max_lifetime_s"}


def load_clients(path: str) -> tuple[ClientConfig, ...]:
    """Trusted EHRs from CDS_CLIENTS_FILE (JSON or YAML). Raises SettingsError naming the problem."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except OSError as exc:
        raise SettingsError(f"CDS_CLIENTS_FILE: cannot read {path}: {exc.strerror}") from None
    except (ValueError, yaml.YAMLError) as exc:
        raise SettingsError(f"CDS_CLIENTS_FILE: {path} is not valid JSON/YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("clients"), list) or not data["clients"]:
        raise SettingsError(f'CDS_CLIENTS_FILE: {path} must hold {{"clients": [...]}} with at least one client')
    clients: list[ClientConfig] = []
    for index, entry in enumerate(data["clients"]):
        client = _client_config(entry, file.parent, f"CDS_CLIENTS_FILE: clients[{index}]")
        if any(known.issuer == client.issuer for known in clients):
            raise SettingsError(f"CDS_CLIENTS_FILE: issuer {client.issuer} is listed twice")
        clients.append(client)
    return tuple(clients)


def _client_config(entry: Any, base_dir: Path, where: str) -> ClientConfig:
    if not isinstance(entry, dict):
        raise SettingsError(f"{where} must be an object")
    unknown = set(entry) - _CLIENT_FIELDS
    if unknown:
        raise SettingsError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_CLIENT_FIELDS)}")
    issuer = entry.get("issuer")
    if not isinstance(issuer, str) or not issuer.strip():
        raise SettingsError(f"{where}: issuer is required (the JWT iss)")
    where = f"{where} ({issuer})"

    algorithms = tuple(_string_list(entry, "algorithms", where) or DEFAULT_ALGORITHMS)
    for alg in algorithms:
        if alg.lower() == "none" or alg.upper().startswith("HS"):
            raise SettingsError(f"{where}: algorithm {alg} is never accepted (CDS Hooks forbids none and symmetric algorithms)")
        if alg not in ALGORITHM_KEYS:
            raise SettingsError(f"{where}: unsupported algorithm {alg}; choose from {sorted(ALGORITHM_KEYS)}")

    sources = [name for name in ("jwks", "jwks_file", "jwks_url") if entry.get(name) is not None]
    jku_allowlist = tuple(_string_list(entry, "jku_allowlist", where))
    if len(sources) > 1:
        raise SettingsError(f"{where}: give one of jwks, jwks_file, jwks_url (found {', '.join(sources)})")
    if not sources and not jku_allowlist:
        raise SettingsError(f"{where}: no keys: give jwks, jwks_file or jwks_url, or a jku_allowlist")

    keys: dict[str, VerificationKey] = {}
    if "jwks" in sources:
        keys = _static_keys(entry["jwks"], where, "jwks")
    elif "jwks_file" in sources:
        jwks_path = base_dir / str(entry["jwks_file"])
        try:
            jwks = json.loads(jwks_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SettingsError(f"{where}: cannot read jwks_file {jwks_path}: {exc}") from None
        keys = _static_keys(jwks, where, f"jwks_file {jwks_path}")
    jwks_url = entry.get("jwks_url")
    for url in ([jwks_url] if jwks_url is not None else []) + list(jku_allowlist):
        _check_key_url(url, where)

    tenants = entry.get("tenants")
    if tenants is not None and not _string_list(entry, "tenants", where):
        raise SettingsError(f"{where}: tenants is empty; omit it to accept any tenant")
    max_lifetime = entry.get("max_lifetime_s")
    if max_lifetime is not None and (not isinstance(max_lifetime, int) or isinstance(max_lifetime, bool) or max_lifetime <= 0):
        raise SettingsError(f"{where}: max_lifetime_s must be a positive integer (seconds)")
    fhir_servers = tuple(_string_list(entry, "fhir_servers", where))
    for url in fhir_servers:
        if not url.startswith(("https://", "http://")):
            raise SettingsError(f"{where}: fhir_servers entry {url!r} is not an http(s) URL")
    return ClientConfig(
        issuer=issuer.strip(),
        algorithms=algorithms,
        fhir_servers=fhir_servers,
        tenants=None if tenants is None else tuple(_string_list(entry, "tenants", where)),
        jwks_url=jwks_url,
        jku_allowlist=jku_allowlist,
        max_lifetime_s=max_lifetime,
        keys=keys,
    )


def _static_keys(jwks: Any, where: str, source: str) -> dict[str, VerificationKey]:
    try:
        keys = parse_jwks(jwks)
    except ValueError as exc:
        raise SettingsError(f"{where}: {source}: {exc}") from None
    if not keys:
        raise SettingsError(f"{where}: {source} has no usable signature key (EC or RSA>={MIN_RSA_BITS}, with kid, use sig)")
    return keys


def _string_list(entry: dict[str, Any], name: str, where: str) -> list[str]:
    value = entry.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise SettingsError(f"{where}: {name} must be a list of strings")
    return value


def _check_key_url(url: Any, where: str) -> None:
    parts = urlsplit(url) if isinstance(url, str) else None
    loopback = parts is not None and parts.hostname in ("localhost", "127.0.0.1", "::1")
    if parts is None or not parts.hostname or not (parts.scheme == "https" or (parts.scheme == "http" and loopback)):
        raise SettingsError(f"{where}: key URL {url!r} must be https (http only on localhost)")
