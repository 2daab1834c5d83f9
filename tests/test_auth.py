"""JWT verification of the calling EHR (cds_service/auth.py).

Keys are generated here with `cryptography`; JWK Sets are served by an in-memory HTTPS fake
(httpx.MockTransport) that records every request, so "no outbound request" is checked, not assumed.
Time is a fake clock passed to the Authenticator.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from base64 import urlsafe_b64encode
from pathlib import Path
from typing import Any, Callable

import anyio
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm, get_default_algorithms

from cds_service.auth import (
    AuthenticatedClient,
    AuthError,
    Authenticator,
    ClientConfig,
    MemoryReplayCache,
    StoreReplayCache,
    expected_audience,
    load_clients,
    parse_jwks,
)
from cds_service.settings import Settings, SettingsError

pytestmark = pytest.mark.anyio

TESTS = Path(__file__).parent
NOW = 1_800_000_000.0

SERVICE_URL = "https://cds.example.org/cds-services/lbp-imaging-order-select"
DISCOVERY_URL = "https://cds.example.org/cds-services"

EHR = "https://ehr.example.org"
EHR_JWKS = "https://ehr.example.org/.well-known/jwks.json"
ES_ONLY = "https://es-only.example.org"
MOVED = "https://moved.example.org"
MOVED_JWKS = "https://moved.example.org/jwks.json"
ATTACKER_JKU = "https://attacker.example/jwks.json"

SANDBOX = "https://sandbox.cds-hooks.org"
SANDBOX_KID = "44823f3d-0b01-4a6c-a80e-b9d3e8a7226f"
SANDBOX_JKU = "https://sandbox.cds-hooks.org/.well-known/jwks.json"

EC_KEY = ec.generate_private_key(ec.SECP384R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_EC_KEY = ec.generate_private_key(ec.SECP384R1())  # the attacker's
ROTATED_EC_KEY = ec.generate_private_key(ec.SECP384R1())

DROP = object()  # a header field or claim to leave out
ALGORITHMS = get_default_algorithms()


# --------------------------------------------------------------------------------------------
# Builders


def public_jwk(private_key: Any, kid: str, alg: str, **extra: Any) -> dict[str, Any]:
    to_jwk = ECAlgorithm.to_jwk if isinstance(private_key, ec.EllipticCurvePrivateKey) else RSAAlgorithm.to_jwk
    return {**json.loads(to_jwk(private_key.public_key())), "kid": kid, "alg": alg, "use": "sig", **extra}


def jwks(*keys: dict[str, Any]) -> dict[str, Any]:
    return {"keys": list(keys)}


EHR_KEYS = jwks(public_jwk(EC_KEY, "ec-1", "ES384"), public_jwk(RSA_KEY, "rsa-1", "RS384"))


def b64url(data: bytes) -> str:
    return urlsafe_b64encode(data).rstrip(b"=").decode()


def compact(header: dict[str, Any] | str, claims: dict[str, Any] | str, sign: Callable[[bytes], bytes]) -> str:
    """A JWS in compact form; header and claims may be given as exact JSON text."""
    header_text = header if isinstance(header, str) else json.dumps(header)
    claims_text = claims if isinstance(claims, str) else json.dumps(claims)
    signing_input = f"{b64url(header_text.encode())}.{b64url(claims_text.encode())}"
    return f"{signing_input}.{b64url(sign(signing_input.encode()))}"


def make_token(
    *,
    key: Any = EC_KEY,
    alg: str = "ES384",
    kid: Any = "ec-1",
    header: dict[str, Any] | None = None,
    claims: dict[str, Any] | None = None,
    sign: Callable[[bytes], bytes] | None = None,
) -> str:
    """A token from the EHR client that passes every check unless told otherwise."""
    full_header = {"alg": alg, "typ": "JWT", "kid": kid, **(header or {})}
    full_claims = {"iss": EHR, "aud": SERVICE_URL, "iat": NOW, "exp": NOW + 300, "jti": str(uuid.uuid4()), **(claims or {})}
    full_header = {name: value for name, value in full_header.items() if value is not DROP}
    full_claims = {name: value for name, value in full_claims.items() if value is not DROP}
    return compact(full_header, full_claims, sign or (lambda message: ALGORITHMS[alg].sign(message, key)))


def bearer(token: str) -> str:
    return f"Bearer {token}"


def public_pem(private_key: Any) -> bytes:
    return private_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def hs256_with_public_key_as_secret() -> str:
    pem = public_pem(EC_KEY)
    return make_token(alg="HS256", sign=lambda message: hmac.new(pem, message, hashlib.sha256).digest())


def swapped_payload() -> str:
    head, _, signature = make_token().split(".")
    other = make_token().split(".")[1]  # valid claims too, another jti
    return f"{head}.{other}.{signature}"


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class JwksServer:
    """Fake HTTPS hosts for JWK Sets; records every request it receives."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.routes: dict[str, Callable[[], httpx.Response]] = {}

    def serve(self, url: str, key_set: dict[str, Any]) -> None:
        self.routes[url] = lambda: httpx.Response(200, json=key_set)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(str(request.url))
        await anyio.sleep(0.01)  # network latency: concurrent callers overlap
        route = self.routes.get(str(request.url))
        return route() if route else httpx.Response(404)

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)


def clients_file(tmp_path: Path, clients: list[dict[str, Any]], name: str = "clients.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps({"clients": clients}), encoding="utf-8")
    return str(path)


def standard_clients() -> list[dict[str, Any]]:
    return [
        {"issuer": EHR, "jwks_url": EHR_JWKS, "jku_allowlist": [EHR_JWKS], "fhir_servers": ["https://fhir.ehr.example.org/r4"]},
        {"issuer": ES_ONLY, "jwks": EHR_KEYS, "algorithms": ["ES384"], "tenants": ["hospital-a"]},
        {"issuer": MOVED, "jwks_url": MOVED_JWKS},
    ]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def server() -> JwksServer:
    server = JwksServer()
    server.serve(EHR_JWKS, EHR_KEYS)
    server.routes[MOVED_JWKS] = lambda: httpx.Response(302, headers={"Location": EHR_JWKS})
    return server


@pytest.fixture
async def auth(tmp_path: Path, server: JwksServer, clock: Clock):
    settings = Settings(clients_file=clients_file(tmp_path, standard_clients()))
    authenticator = Authenticator(settings, transport=server.transport, clock=clock)
    yield authenticator
    await authenticator.aclose()


async def refused(auth: Authenticator, authorization: str | None, audience: str = SERVICE_URL) -> str:
    with pytest.raises(AuthError) as caught:
        await auth.authenticate(audience, authorization)
    return caught.value.reason


# --------------------------------------------------------------------------------------------
# The attack table: every token is refused, for the reason named.

ATTACKS: list[tuple[str, Callable[[], str | None], str]] = [
    ("no Authorization header", lambda: None, "missing bearer token"),
    ("Basic scheme", lambda: "Basic dXNlcjpwYXNz", "not a bearer token"),
    ("garbage", lambda: "Bearer not-a-jwt", "malformed token"),
    ("three garbage segments", lambda: "Bearer a.b.c", "malformed token"),
    ("oversized token", lambda: bearer(make_token(claims={"pad": "x" * 9000})), "token too large"),
    ("alg none", lambda: bearer(make_token(alg="none", sign=lambda message: b"")), "forbidden alg"),
    ("alg NoNe (case)", lambda: bearer(make_token(alg="NoNe", sign=lambda message: b"")), "forbidden alg"),
    ("HS256 signed with the client's public key PEM", lambda: bearer(hs256_with_public_key_as_secret()), "forbidden alg"),
    ("missing kid", lambda: bearer(make_token(kid=DROP)), "missing kid"),
    ("typ not JWT", lambda: bearer(make_token(header={"typ": "at+jwt"})), "typ is not JWT"),
    ("crit header", lambda: bearer(make_token(header={"crit": ["exp-x"], "exp-x": 1})), "malformed token"),
    ("missing iss", lambda: bearer(make_token(claims={"iss": DROP})), "missing iss"),
    ("unknown iss", lambda: bearer(make_token(claims={"iss": "https://evil.example"})), "unknown issuer"),
    ("RS384 for a client that allows only ES384", lambda: bearer(make_token(key=RSA_KEY, alg="RS384", kid="rsa-1", claims={"iss": ES_ONLY, "tenant": "hospital-a"})), "alg not allowed for this client"),
    ("ES256 not enabled for the client", lambda: bearer(make_token(key=ec.generate_private_key(ec.SECP256R1()), alg="ES256")), "alg not allowed for this client"),
    ("missing aud", lambda: bearer(make_token(claims={"aud": DROP})), "missing aud"),
    ("aud of another service", lambda: bearer(make_token(claims={"aud": DISCOVERY_URL + "/another-service"})), "aud mismatch"),
    ("aud of discovery replayed on the service", lambda: bearer(make_token(claims={"aud": DISCOVERY_URL})), "aud mismatch"),
    ("aud array without our URL", lambda: bearer(make_token(claims={"aud": ["https://other.example/cds-services/x"]})), "aud mismatch"),
    ("aud prefix of ours", lambda: bearer(make_token(claims={"aud": "https://cds.example.org"})), "aud mismatch"),
    ("missing exp", lambda: bearer(make_token(claims={"exp": DROP})), "missing exp"),
    ("exp not a number", lambda: bearer(make_token(claims={"exp": "never"})), "exp is not a number"),
    ("expired", lambda: bearer(make_token(claims={"iat": NOW - 400, "exp": NOW - 100})), "expired"),
    ("missing iat", lambda: bearer(make_token(claims={"iat": DROP})), "missing iat"),
    ("iat in the future", lambda: bearer(make_token(claims={"iat": NOW + 120, "exp": NOW + 400})), "iat in the future"),
    ("lifetime too long", lambda: bearer(make_token(claims={"exp": NOW + 3600})), "lifetime too long"),
    ("lifetime 5 min + 30 s (the clock skew is no lifetime allowance)", lambda: bearer(make_token(claims={"exp": NOW + 330})), "lifetime too long"),
    ("exp before iat", lambda: bearer(make_token(claims={"iat": NOW, "exp": NOW - 10})), "exp before iat"),
    ("not yet valid (nbf)", lambda: bearer(make_token(claims={"nbf": NOW + 120})), "not yet valid (nbf)"),
    ("missing jti", lambda: bearer(make_token(claims={"jti": DROP})), "missing jti"),
    ("tenant not allowed", lambda: bearer(make_token(claims={"iss": ES_ONLY, "tenant": "hospital-b"})), "tenant not allowed"),
    ("tenant missing where required", lambda: bearer(make_token(claims={"iss": ES_ONLY})), "tenant not allowed"),
    ("jku not allow-listed", lambda: bearer(make_token(header={"jku": ATTACKER_JKU})), "jku not allowed"),
    ("unknown kid", lambda: bearer(make_token(kid="no-such-kid")), "unknown kid"),
    ("wrong key, same kid", lambda: bearer(make_token(key=OTHER_EC_KEY)), "bad signature"),
    ("attacker key embedded as jwk header", lambda: bearer(make_token(key=OTHER_EC_KEY, header={"jwk": public_jwk(OTHER_EC_KEY, "ec-1", "ES384")})), "unsupported header parameter"),
    ("payload swapped under a valid signature", lambda: bearer(swapped_payload()), "bad signature"),
    ("RS384 header on an EC key", lambda: bearer(make_token(key=RSA_KEY, alg="RS384", kid="ec-1")), "key does not fit alg"),
    ("JWKS URL that redirects elsewhere", lambda: bearer(make_token(claims={"iss": MOVED})), "JWKS unavailable"),
]


@pytest.mark.parametrize(("authorization", "reason"), [(make, reason) for _, make, reason in ATTACKS], ids=[name for name, _, _ in ATTACKS])
async def test_attack_is_refused(auth: Authenticator, server: JwksServer, authorization: Callable[[], str | None], reason: str) -> None:
    assert await refused(auth, authorization()) == reason
    assert ATTACKER_JKU not in server.requests


async def test_attack_table_tokens_differ_from_a_valid_one_only_by_the_attack(auth: Authenticator) -> None:
    # the baseline every attack is built from is accepted, so each refusal is due to the attack
    assert await auth.authenticate(SERVICE_URL, bearer(make_token())) is not None
    assert await auth.authenticate(SERVICE_URL, bearer(make_token(claims={"iss": ES_ONLY, "tenant": "hospital-a"}))) is not None


async def test_unknown_issuer_never_causes_a_request(auth: Authenticator, server: JwksServer) -> None:
    token = make_token(claims={"iss": "https://evil.example"}, header={"jku": ATTACKER_JKU})
    assert await refused(auth, bearer(token)) == "unknown issuer"
    assert server.requests == []


async def test_jku_not_on_the_list_is_never_fetched(auth: Authenticator, server: JwksServer) -> None:
    server.serve(ATTACKER_JKU, jwks(public_jwk(OTHER_EC_KEY, "evil", "ES384")))
    token = make_token(key=OTHER_EC_KEY, kid="evil", header={"jku": ATTACKER_JKU})
    assert await refused(auth, bearer(token)) == "jku not allowed"
    assert server.requests == []


async def test_redirecting_jwks_url_is_not_followed(auth: Authenticator, server: JwksServer) -> None:
    assert await refused(auth, bearer(make_token(claims={"iss": MOVED}))) == "JWKS unavailable"
    assert server.requests == [MOVED_JWKS]


async def test_hmac_is_refused_even_when_configured(server: JwksServer, clock: Clock) -> None:
    client = ClientConfig(issuer=EHR, algorithms=("HS256", "ES384"), keys=parse_jwks(EHR_KEYS))
    auth = Authenticator(Settings(), transport=server.transport, clients=[client], clock=clock)
    assert await refused(auth, bearer(hs256_with_public_key_as_secret())) == "forbidden alg"
    assert await auth.authenticate(SERVICE_URL, bearer(make_token())) is not None
    await auth.aclose()


async def test_replayed_jti_is_refused(auth: Authenticator) -> None:
    token = bearer(make_token())
    assert await auth.authenticate(SERVICE_URL, token) is not None
    assert await refused(auth, token) == "replayed jti"


async def test_same_jti_from_two_issuers_is_not_a_replay(auth: Authenticator) -> None:
    jti = str(uuid.uuid4())
    assert await auth.authenticate(SERVICE_URL, bearer(make_token(claims={"jti": jti})))
    assert await auth.authenticate(SERVICE_URL, bearer(make_token(claims={"jti": jti, "iss": ES_ONLY, "tenant": "hospital-a"})))


async def test_refused_token_does_not_burn_its_jti(auth: Authenticator) -> None:
    jti = str(uuid.uuid4())
    assert await refused(auth, bearer(make_token(key=OTHER_EC_KEY, claims={"jti": jti}))) == "bad signature"
    assert await auth.authenticate(SERVICE_URL, bearer(make_token(claims={"jti": jti}))) is not None


# --------------------------------------------------------------------------------------------
# Accepted tokens


async def test_valid_es384_token(auth: Authenticator) -> None:
    token = make_token(claims={"jti": "jti-1"})
    client = await auth.authenticate(SERVICE_URL, bearer(token))
    assert client == AuthenticatedClient(issuer=EHR, tenant=None, fhir_servers=("https://fhir.ehr.example.org/r4",), jti="jti-1")


async def test_valid_rs384_token(auth: Authenticator) -> None:
    client = await auth.authenticate(SERVICE_URL, bearer(make_token(key=RSA_KEY, alg="RS384", kid="rsa-1")))
    assert client is not None and client.issuer == EHR


async def test_aud_as_one_element_array(auth: Authenticator) -> None:
    assert await auth.authenticate(SERVICE_URL, bearer(make_token(claims={"aud": [SERVICE_URL]}))) is not None


async def test_aud_is_compared_exactly_trailing_slash_included(auth: Authenticator) -> None:
    # RFC 7519 section 2: no canonicalization; the EHR's aud is the URL it calls, and no route ends in '/'
    assert await refused(auth, bearer(make_token(claims={"aud": SERVICE_URL + "/"}))) == "aud mismatch"
    assert await refused(auth, bearer(make_token(claims={"aud": DISCOVERY_URL})), DISCOVERY_URL + "/") == "aud mismatch"


async def test_epic_style_extra_claims_are_accepted(auth: Authenticator) -> None:
    token = make_token(claims={"sub": "epic-client-id", "nbf": NOW, "tenant": "hospital-a", "iss": ES_ONLY})
    client = await auth.authenticate(SERVICE_URL, bearer(token))
    assert client is not None and client.tenant == "hospital-a"


async def test_typ_is_case_insensitive_and_optional(auth: Authenticator) -> None:
    assert await auth.authenticate(SERVICE_URL, bearer(make_token(header={"typ": "jwt"}))) is not None
    assert await auth.authenticate(SERVICE_URL, bearer(make_token(header={"typ": DROP}))) is not None


async def test_allowed_jku_is_used(auth: Authenticator, server: JwksServer) -> None:
    assert await auth.authenticate(SERVICE_URL, bearer(make_token(header={"jku": EHR_JWKS}))) is not None
    assert server.requests == [EHR_JWKS]


async def test_clock_skew_is_tolerated(auth: Authenticator, clock: Clock) -> None:
    assert await auth.authenticate(SERVICE_URL, bearer(make_token(claims={"iat": NOW + 50, "exp": NOW + 350}))) is not None
    assert await auth.authenticate(SERVICE_URL, bearer(make_token(claims={"nbf": NOW + 50}))) is not None
    expired_30s_ago = make_token(claims={"iat": NOW - 330, "exp": NOW - 30})
    assert await auth.authenticate(SERVICE_URL, bearer(expired_30s_ago)) is not None


async def test_lifetime_limit_can_be_raised_per_client(tmp_path: Path, server: JwksServer, clock: Clock) -> None:
    clients = [{"issuer": EHR, "jwks": EHR_KEYS, "max_lifetime_s": 3600}]
    auth = Authenticator(Settings(clients_file=clients_file(tmp_path, clients)), transport=server.transport, clock=clock)
    assert await auth.authenticate(SERVICE_URL, bearer(make_token(claims={"exp": NOW + 3600}))) is not None
    assert await refused(auth, bearer(make_token(claims={"exp": NOW + 7200}))) == "lifetime too long"
    await auth.aclose()


async def test_open_mode_checks_nothing(server: JwksServer) -> None:
    auth = Authenticator(Settings(), transport=server.transport)
    assert auth.required is False and auth.clients == ()
    assert await auth.authenticate(SERVICE_URL, None) is None
    assert await auth.authenticate(SERVICE_URL, "Bearer garbage") is None
    assert server.requests == []
    await auth.aclose()


async def test_required_when_clients_file_is_set(auth: Authenticator) -> None:
    assert auth.required is True
    assert [client.issuer for client in auth.clients] == [EHR, ES_ONLY, MOVED]


# --------------------------------------------------------------------------------------------
# Key sets: rotation, rate limit, cache, failures


async def test_rotation_unknown_kid_refetch_is_rate_limited_then_accepted(auth: Authenticator, server: JwksServer, clock: Clock) -> None:
    assert await auth.authenticate(SERVICE_URL, bearer(make_token())) is not None
    assert server.requests == [EHR_JWKS]
    server.serve(EHR_JWKS, jwks(public_jwk(EC_KEY, "ec-1", "ES384"), public_jwk(ROTATED_EC_KEY, "ec-2", "ES384")))

    clock.now += 10  # the EHR rotates; within the refetch interval the new kid is not fetched yet
    rotated = lambda: bearer(make_token(key=ROTATED_EC_KEY, kid="ec-2", claims={"iat": clock.now, "exp": clock.now + 300}))  # noqa: E731
    assert await refused(auth, rotated()) == "unknown kid"
    assert server.requests == [EHR_JWKS]

    clock.now += 60  # interval over: one refetch, then accepted
    assert await auth.authenticate(SERVICE_URL, rotated()) is not None
    assert server.requests == [EHR_JWKS, EHR_JWKS]


async def test_unknown_kid_flood_causes_at_most_one_fetch_per_interval(auth: Authenticator, server: JwksServer, clock: Clock) -> None:
    async def try_unknown_kid(index: int) -> None:
        with pytest.raises(AuthError):
            await auth.authenticate(SERVICE_URL, bearer(make_token(kid=f"ghost-{index}")))

    async with anyio.create_task_group() as tasks:
        for index in range(20):
            tasks.start_soon(try_unknown_kid, index)
    assert server.requests == [EHR_JWKS]

    clock.now += 59
    await try_unknown_kid(99)
    assert server.requests == [EHR_JWKS]
    clock.now += 2
    await try_unknown_kid(100)
    assert server.requests == [EHR_JWKS, EHR_JWKS]


async def test_concurrent_first_requests_share_one_fetch(auth: Authenticator, server: JwksServer) -> None:
    accepted: list[AuthenticatedClient | None] = []

    async def call() -> None:
        accepted.append(await auth.authenticate(SERVICE_URL, bearer(make_token())))

    async with anyio.create_task_group() as tasks:
        for _ in range(10):
            tasks.start_soon(call)
    assert len(accepted) == 10 and None not in accepted
    assert server.requests == [EHR_JWKS]


async def test_key_set_is_cached_then_refreshed_after_ttl(auth: Authenticator, server: JwksServer, clock: Clock) -> None:
    for _ in range(3):
        assert await auth.authenticate(SERVICE_URL, bearer(make_token())) is not None
    assert server.requests == [EHR_JWKS]
    clock.now += 3601
    assert await auth.authenticate(SERVICE_URL, bearer(make_token(claims={"iat": clock.now, "exp": clock.now + 300}))) is not None
    assert server.requests == [EHR_JWKS, EHR_JWKS]


async def test_key_removed_from_the_set_stops_working_after_ttl(auth: Authenticator, server: JwksServer, clock: Clock) -> None:
    assert await auth.authenticate(SERVICE_URL, bearer(make_token())) is not None
    server.serve(EHR_JWKS, jwks(public_jwk(ROTATED_EC_KEY, "ec-2", "ES384")))
    clock.now += 3601
    assert await refused(auth, bearer(make_token(claims={"iat": clock.now, "exp": clock.now + 300}))) == "unknown kid"


async def endless_body():
    while True:  # chunked, no Content-Length
        await anyio.sleep(0)
        yield b" " * 10_000


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        (lambda: httpx.Response(500), "JWKS unavailable"),
        (lambda: httpx.Response(200, text="<html>not json</html>"), "JWKS unavailable"),
        (lambda: httpx.Response(200, json={"not": "a key set"}), "JWKS unavailable"),
        (lambda: httpx.Response(200, json={"keys": [], "pad": "x" * 200_000}), "JWKS unavailable"),
        (lambda: httpx.Response(200, content=endless_body()), "JWKS unavailable"),
        (lambda: httpx.Response(200, json=jwks(public_jwk(EC_KEY, "ec-1", "ES384", use="enc"))), "unknown kid"),
        (lambda: httpx.Response(200, json=jwks({"kty": "oct", "kid": "ec-1", "k": b64url(public_pem(EC_KEY))})), "unknown kid"),
    ],
    ids=["http-500", "not-json", "not-a-key-set", "too-large", "too-large-streamed", "use-enc-only", "symmetric-key"],
)
async def test_unusable_key_sets_are_refused(auth: Authenticator, server: JwksServer, response: Callable[[], httpx.Response], reason: str) -> None:
    server.routes[EHR_JWKS] = response
    with anyio.fail_after(1):  # refused at once, not by the fetch deadline
        assert await refused(auth, bearer(make_token())) == reason


async def test_jwks_timeout_is_a_failure(tmp_path: Path, clock: Clock) -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await anyio.sleep(30)
        return httpx.Response(200, json=EHR_KEYS)

    settings = Settings(clients_file=clients_file(tmp_path, standard_clients()))
    auth = Authenticator(settings, transport=httpx.MockTransport(slow), clock=clock)
    with anyio.fail_after(10):
        assert await refused(auth, bearer(make_token())) == "JWKS unavailable"
    await auth.aclose()


def test_parse_jwks_keeps_only_signature_keys() -> None:
    small_rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    keys = parse_jwks(
        jwks(
            public_jwk(EC_KEY, "sig", "ES384"),
            {k: v for k, v in public_jwk(EC_KEY, "no-use", "ES384").items() if k != "use"},
            public_jwk(EC_KEY, "enc", "ES384", use="enc"),
            public_jwk(EC_KEY, "ops-sign-only", "ES384", key_ops=["sign"]),
            public_jwk(small_rsa, "rsa-1024", "RS384"),
            {k: v for k, v in public_jwk(EC_KEY, "x", "ES384").items() if k != "kid"},
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "EC", "kid": "broken", "crv": "P-384", "x": "AA", "y": "AA"},
        )
    )
    assert sorted(keys) == ["no-use", "sig"]


def test_private_members_of_a_jwk_are_ignored() -> None:
    jwk = {**public_jwk(EC_KEY, "k", "ES384"), "d": json.loads(ECAlgorithm.to_jwk(EC_KEY))["d"]}
    key = parse_jwks(jwks(jwk))["k"].key
    assert isinstance(key, ec.EllipticCurvePublicKey)


# --------------------------------------------------------------------------------------------
# The CDS Hooks Sandbox as a configured client (issuer https://sandbox.cds-hooks.org)

# A token the hosted sandbox actually issued (2020-07-08, aud http://127.0.0.1:8000/cds-services),
# published in a public GitHub repository as a python-jose example. Signed by jsrsasign, not by us.
SANDBOX_ISSUED_TOKEN = (
    "eyJhbGciOiJFUzM4NCIsInR5cCI6IkpXVCIsImtpZCI6IjQ0ODIzZjNkLTBiMDEtNGE2Yy1hODBlLWI5ZDNlOGE3MjI2ZiIsImprdSI6Imh0dHBzOi8vc2FuZGJveC5jZHMtaG9va3Mub3JnLy53ZWxsLWtub3duL2p3a3MuanNvbiJ9"
    ".eyJpc3MiOiJodHRwczovL3NhbmRib3guY2RzLWhvb2tzLm9yZyIsImF1ZCI6Imh0dHA6Ly8xMjcuMC4wLjE6ODAwMC9jZHMtc2VydmljZXMiLCJleHAiOjE1OTQyMzA5MDAsImlhdCI6MTU5NDIzMDYwMCwianRpIjoiZWZiMzc3M2QtM2EyOC00M2UyLTlmYmMtYjkzNmE5YWUzODhiIn0"
    ".Cbey3n5NkDRoCLHZ2WMFc1z_RY8Rlq5oGxdAYfbrBPMiJXLCwjbYoU0av2CQj-Olhbnpe7Vs8vzJ5oHP5gc2-0ooc5J49t4Uz9iYKpiM9KLUrqaJe0umc_klM2-ynHAI"
)
SANDBOX_ISSUED_AT = 1594230600


def sandbox_clients(tmp_path: Path) -> str:
    # out-of-band key set (the sandbox's published JWKS) + its jku on the list: works offline
    jwks_file = str(TESTS / "data" / "sandbox-jwks.json")
    return clients_file(tmp_path, [{"issuer": SANDBOX, "jwks_file": jwks_file, "jku_allowlist": [SANDBOX_JKU]}])


def sandbox_token(audience: str, now: float) -> str:
    """Signed like the sandbox's src/retrieve-data-helpers/jwt-generator.js (same JSON text, same key)."""
    private_key = serialization.load_pem_private_key((TESTS / "keys" / "sandbox-ecprivkey.pem").read_bytes(), password=None)
    payload = json.dumps(
        {"iss": SANDBOX, "aud": audience, "exp": round(now + 300), "iat": round(now), "jti": str(uuid.uuid4())}, separators=(",", ":")
    )
    header = json.dumps({"alg": "ES384", "typ": "JWT", "kid": SANDBOX_KID, "jku": SANDBOX_JKU}, separators=(",", ":"))
    return compact(header, payload, lambda message: ALGORITHMS["ES384"].sign(message, private_key))


def test_sandbox_jwks_is_the_public_half_of_the_sandbox_key() -> None:
    private_key = serialization.load_pem_private_key((TESTS / "keys" / "sandbox-ecprivkey.pem").read_bytes(), password=None)
    published = json.loads((TESTS / "data" / "sandbox-jwks.json").read_text())["keys"][0]
    assert published["kid"] == SANDBOX_KID and published["use"] == "sig" and published["alg"] == "ES384"
    assert published["x"] == json.loads(ECAlgorithm.to_jwk(private_key.public_key()))["x"]


async def test_sandbox_issued_token_is_accepted(tmp_path: Path, server: JwksServer) -> None:
    clock = Clock(SANDBOX_ISSUED_AT + 10)
    auth = Authenticator(Settings(clients_file=sandbox_clients(tmp_path)), transport=server.transport, clock=clock)
    client = await auth.authenticate("http://127.0.0.1:8000/cds-services", bearer(SANDBOX_ISSUED_TOKEN))
    assert client == AuthenticatedClient(issuer=SANDBOX, tenant=None, fhir_servers=(), jti="efb3773d-3a28-43e2-9fbc-b936a9ae388b")
    assert server.requests == []  # the jku is on the list, the kid is in the configured set: nothing fetched
    assert await refused(auth, bearer(SANDBOX_ISSUED_TOKEN), "http://127.0.0.1:8000/cds-services") == "replayed jti"
    clock.now = SANDBOX_ISSUED_AT + 400
    assert await refused(auth, bearer(SANDBOX_ISSUED_TOKEN), "http://127.0.0.1:8000/cds-services") == "expired"
    await auth.aclose()


async def test_token_signed_like_the_sandbox_is_accepted(tmp_path: Path, server: JwksServer, clock: Clock) -> None:
    auth = Authenticator(Settings(clients_file=sandbox_clients(tmp_path)), transport=server.transport, clock=clock)
    for audience in (DISCOVERY_URL, SERVICE_URL, SERVICE_URL + "/feedback"):
        assert await auth.authenticate(audience, bearer(sandbox_token(audience, NOW))) is not None
    assert await refused(auth, bearer(sandbox_token(DISCOVERY_URL, NOW)), SERVICE_URL) == "aud mismatch"
    assert server.requests == []
    await auth.aclose()


async def test_sandbox_without_its_jku_on_the_list_is_refused(tmp_path: Path, server: JwksServer, clock: Clock) -> None:
    jwks_file = str(TESTS / "data" / "sandbox-jwks.json")
    auth = Authenticator(
        Settings(clients_file=clients_file(tmp_path, [{"issuer": SANDBOX, "jwks_file": jwks_file}])), transport=server.transport, clock=clock
    )
    assert await refused(auth, bearer(sandbox_token(SERVICE_URL, NOW))) == "jku not allowed"
    assert server.requests == []
    await auth.aclose()


# --------------------------------------------------------------------------------------------
# Logging: one line per refusal, reason + iss + jti hash; never the token


async def test_refusal_log_line_names_reason_and_issuer_not_the_token(auth: Authenticator, caplog: pytest.LogCaptureFixture) -> None:
    token = make_token(claims={"jti": "secret-jti", "exp": NOW + 3600, "sub": "user-123"})
    caplog.set_level(logging.DEBUG, logger="cds_service.auth")
    await refused(auth, bearer(token))
    records = [record for record in caplog.records if record.name == "cds_service.auth"]
    assert len(records) == 1
    line = records[0].getMessage()
    assert "lifetime too long" in line and EHR in line
    assert hashlib.sha256(b"secret-jti").hexdigest()[:12] in line
    for forbidden in ("eyJ", token.split(".")[2][:20], "secret-jti", "user-123", SERVICE_URL):
        assert forbidden not in line


async def test_log_of_hostile_issuer_is_one_escaped_line(auth: Authenticator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cds_service.auth")
    await refused(auth, bearer(make_token(claims={"iss": "https://x\nFAKE LOG LINE" + "y" * 500})))
    line = caplog.records[-1].getMessage()
    assert "\n" not in line and len(line) < 300


# --------------------------------------------------------------------------------------------
# Replay caches


async def test_memory_replay_cache_expires_entries() -> None:
    clock = Clock()
    cache = MemoryReplayCache(clock=clock)
    assert await cache.remember("iss|a", NOW + 10) is True
    assert await cache.remember("iss|a", NOW + 10) is False
    clock.now += 11
    assert await cache.remember("iss|b", NOW + 30) is True
    assert len(cache) == 1  # "iss|a" expired and was dropped
    assert await cache.remember("iss|a", NOW + 40) is True


async def test_memory_replay_cache_is_bounded() -> None:
    cache = MemoryReplayCache(max_entries=3, clock=Clock())
    for index in range(10):
        assert await cache.remember(f"iss|{index}", NOW + 100 + index) is True
    assert len(cache) == 3
    assert await cache.remember("iss|9", NOW + 109) is False  # the latest-expiring entries are kept


async def test_store_replay_cache_calls_the_store_in_a_worker_thread() -> None:
    class Store:
        def __init__(self) -> None:
            self.seen: dict[str, float] = {}
            self.threads: set[int] = set()

        def remember_jti(self, key: str, expires_at: float) -> bool:
            self.threads.add(threading.get_ident())
            if key in self.seen:
                return False
            self.seen[key] = expires_at
            return True

    store = Store()
    cache = StoreReplayCache(store)
    assert await cache.remember("iss|x", NOW) is True
    assert await cache.remember("iss|x", NOW) is False
    assert store.seen == {"iss|x": NOW}
    assert threading.get_ident() not in store.threads


async def test_authenticator_uses_the_given_replay_cache(tmp_path: Path, server: JwksServer, clock: Clock) -> None:
    calls: list[tuple[str, float]] = []

    class Recording:
        async def remember(self, key: str, expires_at: float) -> bool:
            calls.append((key, expires_at))
            return True

    settings = Settings(clients_file=clients_file(tmp_path, standard_clients()), jwt_clock_skew_s=60)
    auth = Authenticator(settings, replay_cache=Recording(), transport=server.transport, clock=clock)
    await auth.authenticate(SERVICE_URL, bearer(make_token(claims={"jti": "j-1"})))
    assert calls == [(f"{EHR}|j-1", NOW + 300 + 60)]
    await auth.aclose()


# --------------------------------------------------------------------------------------------
# Expected audience


@pytest.mark.parametrize(
    ("public_base_url", "request_url", "expected"),
    [
        (None, "http://localhost:8090/cds-services?x=1", "http://localhost:8090/cds-services"),
        (None, "http://localhost:8090/cds-services/lbp/feedback", "http://localhost:8090/cds-services/lbp/feedback"),
        ("https://cds.example.org", "http://10.0.0.5:8000/cds-services/lbp?a=b", "https://cds.example.org/cds-services/lbp"),
        ("https://cds.example.org/", "http://10.0.0.5:8000/cds-services", "https://cds.example.org/cds-services"),
        ("https://example.org/cds", "http://app:8000/cds-services", "https://example.org/cds/cds-services"),
    ],
)
def test_expected_audience(public_base_url: str | None, request_url: str, expected: str) -> None:
    assert expected_audience(Settings(public_base_url=public_base_url), request_url) == expected


# --------------------------------------------------------------------------------------------
# Clients file


def test_clients_file_in_yaml(tmp_path: Path) -> None:
    path = tmp_path / "clients.yaml"
    path.write_text(
        f"""
clients:
  - issuer: {EHR}
    jwks_url: {EHR_JWKS}
    fhir_servers: [https://fhir.ehr.example.org/r4]
    tenants: [hospital-a]
    algorithms: [ES384, ES256]
""",
        encoding="utf-8",
    )
    (client,) = load_clients(str(path))
    assert client.issuer == EHR and client.algorithms == ("ES384", "ES256") and client.tenants == ("hospital-a",)
    assert client.jwks_url == EHR_JWKS and client.fhir_servers == ("https://fhir.ehr.example.org/r4",)


def test_clients_file_defaults(tmp_path: Path) -> None:
    (client,) = load_clients(clients_file(tmp_path, [{"issuer": EHR, "jwks": EHR_KEYS}]))
    assert client.algorithms == ("ES384", "RS384") and client.tenants is None and client.jku_allowlist == ()
    assert sorted(client.keys) == ["ec-1", "rsa-1"]


def test_jwks_file_is_relative_to_the_clients_file(tmp_path: Path) -> None:
    (tmp_path / "keys.json").write_text(json.dumps(EHR_KEYS), encoding="utf-8")
    (client,) = load_clients(clients_file(tmp_path, [{"issuer": EHR, "jwks_file": "keys.json"}]))
    assert sorted(client.keys) == ["ec-1", "rsa-1"]


@pytest.mark.parametrize(
    ("clients", "message"),
    [
        ([], "at least one client"),
        ([{"jwks": EHR_KEYS}], "issuer is required"),
        ([{"issuer": EHR}], "no keys"),
        ([{"issuer": EHR, "jwks": EHR_KEYS, "jwks_url": EHR_JWKS}], "give one of"),
        ([{"issuer": EHR, "jwks": EHR_KEYS, "algorithms": ["HS256"]}], "never accepted"),
        ([{"issuer": EHR, "jwks": EHR_KEYS, "algorithms": ["none"]}], "never accepted"),
        ([{"issuer": EHR, "jwks": EHR_KEYS, "algorithms": ["EdDSA"]}], "unsupported algorithm"),
        ([{"issuer": EHR, "jwks": EHR_KEYS, "jwks_uri": EHR_JWKS}], "unknown field"),
        ([{"issuer": EHR, "jwks": jwks(public_jwk(EC_KEY, "e", "ES384", use="enc"))}], "no usable signature key"),
        ([{"issuer": EHR, "jwks": {"kty": "EC"}}], "JWK Set"),
        ([{"issuer": EHR, "jwks_url": "http://ehr.example.org/jwks.json"}], "must be https"),
        ([{"issuer": EHR, "jku_allowlist": ["ftp://ehr.example.org/jwks.json"]}], "must be https"),
        ([{"issuer": EHR, "jwks_file": "missing.json"}], "cannot read jwks_file"),
        ([{"issuer": EHR, "jwks": EHR_KEYS, "tenants": []}], "tenants is empty"),
        ([{"issuer": EHR, "jwks": EHR_KEYS, "tenants": "hospital-a"}], "tenants must be a list"),
        ([{"issuer": EHR, "jwks": EHR_KEYS, "fhir_servers": ["fhir.example.org"]}], "not an http(s) URL"),
        ([{"issuer": EHR, "jwks": EHR_KEYS, "max_lifetime_s": 0}], "max_lifetime_s"),
        ([{"issuer": EHR, "jwks": EHR_KEYS}, {"issuer": EHR, "jwks": EHR_KEYS}], "listed twice"),
    ],
)
def test_bad_clients_file_is_refused_with_a_clear_message(tmp_path: Path, clients: list[Any], message: str) -> None:
    with pytest.raises(SettingsError, match="CDS_CLIENTS_FILE") as caught:
        load_clients(clients_file(tmp_path, clients))
    assert message in str(caught.value)


def test_unreadable_clients_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read"):
        load_clients(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(SettingsError, match="not valid JSON/YAML"):
        load_clients(str(tmp_path / "bad.json"))


def test_http_key_url_allowed_on_localhost(tmp_path: Path) -> None:
    (client,) = load_clients(clients_file(tmp_path, [{"issuer": EHR, "jwks_url": "http://localhost:9000/jwks.json"}]))
    assert client.jwks_url == "http://localhost:9000/jwks.json"


# --------------------------------------------------------------------------------------------
# HTTP: the three endpoints answer 401 (bare, with WWW-Authenticate: Bearer) without a valid JWT

PUBLIC_BASE = "https://cds.example.org"
SERVICE_ID = "lumbar-imaging-order-select"
HTTP_ENDPOINTS = [
    ("GET", "/cds-services"),
    ("POST", f"/cds-services/{SERVICE_ID}"),
    ("POST", f"/cds-services/{SERVICE_ID}/feedback"),
]


def live_token(path: str, **claims: Any) -> str:
    now = time.time()
    return make_token(claims={"aud": PUBLIC_BASE + path, "iat": now, "exp": now + 300, **claims})


@pytest.fixture
def http(tmp_path: Path):
    from fastapi.testclient import TestClient

    from cds_service.app import create_app

    clients = [{"issuer": EHR, "jwks": EHR_KEYS, "fhir_servers": ["https://fhir.ehr.example.org/r4"]}]
    settings = Settings(
        clients_file=clients_file(tmp_path, clients), public_base_url=PUBLIC_BASE, database_url=f"sqlite:///{tmp_path / 'cds.db'}"
    )
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.mark.parametrize(("method", "path"), HTTP_ENDPOINTS)
@pytest.mark.parametrize(
    "authorization",
    [None, "Basic dXNlcjpwYXNz", "Bearer garbage", "wrong-aud", "expired", "alg-none"],
)
def test_http_endpoint_refuses_without_a_valid_jwt(http, caplog: pytest.LogCaptureFixture, method: str, path: str, authorization: str | None) -> None:
    now = time.time()
    tokens = {
        "wrong-aud": bearer(live_token("/cds-services/another-service")),
        "expired": bearer(make_token(claims={"aud": PUBLIC_BASE + path, "iat": now - 1000, "exp": now - 700})),
        "alg-none": bearer(make_token(alg="none", claims={"aud": PUBLIC_BASE + path}, sign=lambda message: b"")),
    }
    authorization = tokens.get(authorization, authorization)
    headers = {"Authorization": authorization} if authorization else {}
    caplog.set_level(logging.DEBUG)
    response = http.request(method, path, headers=headers, content=b"{}")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    for detail in ("aud", "expired", "alg", "malformed", "bearer token", EHR):
        assert detail not in response.text  # 401 without details
    assert all("eyJ" not in record.getMessage() for record in caplog.records)  # the token is never logged


@pytest.mark.parametrize(("method", "path"), HTTP_ENDPOINTS)
def test_http_endpoint_accepts_a_valid_jwt(http, method: str, path: str) -> None:
    response = http.request(method, path, headers={"Authorization": bearer(live_token(path))}, content=b"{}")
    # authenticated: discovery answers 200; the POSTs go on to validate the (empty) body: 400, not 401
    assert response.status_code == (200 if method == "GET" else 400)


def test_http_replayed_token_is_refused(http) -> None:
    token = bearer(live_token("/cds-services"))
    assert http.get("/cds-services", headers={"Authorization": token}).status_code == 200
    assert http.get("/cds-services", headers={"Authorization": token}).status_code == 401


def test_http_discovery_token_is_refused_on_the_service_endpoint(http) -> None:
    token = bearer(live_token("/cds-services"))
    assert http.post(f"/cds-services/{SERVICE_ID}", headers={"Authorization": token}, content=b"{}").status_code == 401


def test_http_audience_comes_from_the_public_base_url_not_the_host_header(http) -> None:
    # a token the EHR issued to another CDS service, forwarded to us with that service's Host header
    now = time.time()
    forwarded = make_token(claims={"aud": "http://other-cds.example/cds-services", "iat": now, "exp": now + 300})
    response = http.get("/cds-services", headers={"Authorization": bearer(forwarded), "Host": "other-cds.example"})
    assert response.status_code == 401
