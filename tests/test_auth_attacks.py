"""A hostile client against the real service: forged JWTs, one named case each (cds_service/auth.py).

CDS Hooks 2.0 "Trusting CDS Clients": the EHR signs a JWT (alg ES384/RS384, kid, typ JWT, optional jku;
claims iss, aud = the endpoint called, exp, iat, jti, optional sub and tenant) and the service checks it
against the EHR's JWK Set. Every case below must get a 401 that is byte-for-byte the bare 401 of a
request without any token (WWW-Authenticate: Bearer, no detail), never a 500 and never an acceptance; the
auth log line must name the expected reason (so a case proves what it attacks, not some incidental
defect) and neither the body nor any log record may carry the token.

Layers:
  ATTACKS           one forged Authorization header per case, sent to discovery, both services and
                    a feedback endpoint of the app in-process (create_app + TestClient, a real clients file,
                    the real SQLite replay cache);
  replay            the same token or jti twice, malleable (high-S) ECDSA signatures, across endpoints;
  jku               real loopback HTTP servers record every request: no forged jku is ever fetched;
  uvicorn           the service as a process (tests/server_support.live_server): header-level tricks,
                    100 KB and 10 MB headers, and two workers sharing the replay cache.

A case tagged ``hole=`` (see HOLES) failed before the commit that closed it; while its hole is in
OPEN_HOLES the case is a strict xfail, so the suite says which attacks still succeed.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import logging
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from base64 import urlsafe_b64encode
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from jwt.algorithms import ECAlgorithm, RSAAlgorithm, get_default_algorithms

from cds_service.app import create_app
from cds_service.settings import Settings
from server_support import REPO, free_port, live_server, service_environment, wait_healthy

PUBLIC_BASE = "https://cds.example.org"
SELECT = "lumbar-imaging-order-select"
SIGN = "lumbar-imaging-order-sign"
DISCOVERY = "/cds-services"
SERVICE = f"/cds-services/{SELECT}"
FEEDBACK = f"/cds-services/{SELECT}/feedback"
ENDPOINTS = [("GET", DISCOVERY), ("POST", SERVICE), ("POST", f"/cds-services/{SIGN}"), ("POST", FEEDBACK)]

EHR = "https://ehr.example.org"  # client A
EHR_B = "https://ehr-b.example.org"  # client B: its own keys, one with the same kid as A's
ATTACKER_JKU = "https://attacker.example/jwks.json"

EC_KEY = ec.generate_private_key(ec.SECP384R1())  # A: kid ec-1
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # A: kid rsa-1
B_KEY = ec.generate_private_key(ec.SECP384R1())  # B: kid ec-1 (same name, other key)
B_ONLY_KEY = ec.generate_private_key(ec.SECP384R1())  # B: kid b-only
ATTACKER_EC = ec.generate_private_key(ec.SECP384R1())
ATTACKER_P256 = ec.generate_private_key(ec.SECP256R1())
ATTACKER_P521 = ec.generate_private_key(ec.SECP521R1())
ATTACKER_ED = ed25519.Ed25519PrivateKey.generate()
P384_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973

ALGORITHMS = get_default_algorithms()
DROP = object()  # a header field or claim to leave out

# What this suite found. A case tagged with one of these failed before the commit that closed it: the
# token was accepted, the service crashed (500), or a later check refused it only by luck.
HOLES: dict[str, str] = {
    "numeric-date-overflow": "exp/iat/nbf as a 400-digit integer: OverflowError in math.isfinite -> 500",
    "json-parsing": "claims nested 2,000 deep: RecursionError in json.loads -> 500; claims in UTF-16 accepted",
    "compact-form": "non-canonical compact serialization (padding on the signature) accepted",
    "duplicate-members": "duplicate JSON member names (two alg, two aud, ...) accepted: the last one wins",
    "header-params": "crit/b64/jwk/x5u/x5c header parameters accepted on a validly signed token",
    "claim-types": "sub/tenant present but empty or not a string, nbf null: accepted",
    "aud-single": "aud array with our URL and other audiences accepted",
    "aud-exact": "aud compared after trimming a trailing slash (RFC 7519: no canonicalization)",
    "lifetime-skew": "exp - iat up to CDS_JWT_MAX_LIFETIME + CDS_JWT_CLOCK_SKEW (360 s) accepted: the skew is not a lifetime allowance",
    "duplicate-authorization": "two Authorization headers: app.py read the first",
}
# Still open: their cases are strict xfails (they still get through). The others were closed by the commits
# of cds_service/auth.py that name them.
OPEN_HOLES: set[str] = set()


# --------------------------------------------------------------------------------------------
# Forging


def b64url(data: bytes) -> str:
    return urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(private_key: Any, kid: str, alg: str) -> dict[str, Any]:
    to_jwk = ECAlgorithm.to_jwk if isinstance(private_key, ec.EllipticCurvePrivateKey) else RSAAlgorithm.to_jwk
    return {**json.loads(to_jwk(private_key.public_key())), "kid": kid, "alg": alg, "use": "sig"}


def public_pem(private_key: Any) -> bytes:
    return private_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_der(private_key: Any) -> bytes:
    return private_key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


A_JWKS = {"keys": [public_jwk(EC_KEY, "ec-1", "ES384"), public_jwk(RSA_KEY, "rsa-1", "RS384")]}
B_JWKS = {"keys": [public_jwk(B_KEY, "ec-1", "ES384"), public_jwk(B_ONLY_KEY, "b-only", "ES384")]}


def signer(alg: str, key: Any) -> Callable[[bytes], bytes]:
    return lambda message: ALGORITHMS[alg].sign(message, key)


def hmac_signer(digest: Any, secret: bytes) -> Callable[[bytes], bytes]:
    return lambda message: hmac.new(secret, message, digest).digest()


def compact(header: dict[str, Any] | str, claims: dict[str, Any] | str | bytes, sign: Callable[[bytes], bytes]) -> str:
    """A JWS in compact form; header and claims may be exact JSON text (claims: exact bytes)."""
    header_bytes = (header if isinstance(header, str) else json.dumps(header)).encode()
    if isinstance(claims, bytes):
        claims_bytes = claims
    else:
        claims_bytes = (claims if isinstance(claims, str) else json.dumps(claims)).encode()
    signing_input = f"{b64url(header_bytes)}.{b64url(claims_bytes)}"
    return f"{signing_input}.{b64url(sign(signing_input.encode()))}"


def header_of(alg: str = "ES384", kid: Any = "ec-1", **extra: Any) -> dict[str, Any]:
    header = {"alg": alg, "typ": "JWT", "kid": kid, **extra}
    return {name: value for name, value in header.items() if value is not DROP}


def claims_for(path: str, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": EHR, "aud": PUBLIC_BASE + path, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4()), **extra}
    return {name: value for name, value in claims.items() if value is not DROP}


def forge(
    path: str,
    *,
    key: Any = EC_KEY,
    alg: str = "ES384",
    kid: Any = "ec-1",
    header: dict[str, Any] | None = None,
    claims: dict[str, Any] | None = None,
    sign: Callable[[bytes], bytes] | None = None,
) -> str:
    """A token of client A for ``path`` that passes every check unless told otherwise."""
    return compact(header_of(alg, kid, **(header or {})), claims_for(path, **(claims or {})), sign or signer(alg, key))


def bearer(token: str) -> str:
    return f"Bearer {token}"


def with_signature(token: str, signature: bytes) -> str:
    head, payload, _ = token.split(".")
    return f"{head}.{payload}.{b64url(signature)}"


def signature_of(token: str) -> bytes:
    segment = token.split(".")[2]
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def high_s(token: str) -> str:
    """The same ES384 token with the other valid signature (r, n - s): different bytes, same claims."""
    raw = signature_of(token)
    s = int.from_bytes(raw[48:], "big")
    return with_signature(token, raw[:48] + (P384_ORDER - s).to_bytes(48, "big"))


def der_signature(token: str) -> str:
    raw = signature_of(token)
    return with_signature(token, encode_dss_signature(int.from_bytes(raw[:48], "big"), int.from_bytes(raw[48:], "big")))


def with_json(path: str, header_text: str | None = None, claims_text: str | bytes | None = None, key: Any = EC_KEY) -> str:
    """A token of client A, validly signed, whose header or claims are the exact JSON text given."""
    return compact(header_text or json.dumps(header_of()), claims_text if claims_text is not None else json.dumps(claims_for(path)), signer("ES384", key))


def duplicate_first(obj: dict[str, Any], name: str, value: Any) -> str:
    """JSON text of ``obj`` with an extra ``name`` member placed first (Python's json keeps the last)."""
    return "{" + json.dumps(name) + ":" + json.dumps(value) + "," + json.dumps(obj)[1:]


def duplicate_last(obj: dict[str, Any], name: str, value: Any) -> str:
    return json.dumps(obj)[:-1] + "," + json.dumps(name) + ":" + json.dumps(value) + "}"


def rsa_token_with_padded_signature(path: str) -> str:
    token = forge(path, key=RSA_KEY, alg="RS384", kid="rsa-1")  # 256-byte signature: 342 chars, '==' to pad
    return token + "=="


def with_url_alphabet_swapped(path: str) -> str:
    """A valid token whose signature segment uses '+' '/' (base64, not base64url) where it had '-' '_'."""
    for _ in range(100):
        token = forge(path)
        head, payload, signature = token.split(".")
        if "-" in signature or "_" in signature:
            return f"{head}.{payload}.{signature.replace('-', '+').replace('_', '/')}"
    raise AssertionError("no signature with - or _ in 100 tries")


def self_signed_certificate_b64(private_key: Any) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ehr.example.org")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private_key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(private_key, hashes.SHA384())
    )
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


def padded_header(token: str) -> str:
    """The token with '=' padding on its header segment (re-signed, so only the padding is wrong)."""
    for extra in ("", "a", "ab"):
        header = b64url(json.dumps(header_of(x=extra)).encode())
        if len(header) % 4:
            claims = token.split(".")[1]
            signing_input = f"{header}{'=' * (-len(header) % 4)}.{claims}"
            return f"{signing_input}.{b64url(ALGORITHMS['ES384'].sign(signing_input.encode(), EC_KEY))}"
    raise AssertionError("unreachable")


def jwe_like(path: str) -> str:
    header = b64url(json.dumps({"alg": "RSA-OAEP", "enc": "A256GCM", "kid": "rsa-1", "typ": "JWT"}).encode())
    return ".".join([header, b64url(b"k" * 256), b64url(b"i" * 12), b64url(json.dumps(claims_for(path)).encode()), b64url(b"t" * 16)])


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# --------------------------------------------------------------------------------------------
# The attack table


@dataclass(frozen=True)
class Attack:
    name: str
    authorization: Callable[[str], str | bytes | None]  # the endpoint path -> the Authorization header value
    reason: str  # the reason the auth log line names
    hole: str | None = None  # the OPEN_HOLES key, for a case that got through before its fix


def token_case(name: str, reason: str, make: Callable[[str], str], hole: str | None = None) -> Attack:
    return Attack(name, lambda path: bearer(make(path)), reason, hole)


def forged(name: str, reason: str, hole: str | None = None, **options: Any) -> Attack:
    return token_case(name, reason, lambda path: forge(path, **options), hole)


def claim(name: str, reason: str, hole: str | None = None, **claims: Any) -> Attack:
    return forged(name, reason, hole, claims=claims)


def aud(name: str, value: Callable[[str], Any], reason: str = "aud mismatch", hole: str | None = None) -> Attack:
    return token_case(name, reason, lambda path: forge(path, claims={"aud": value(path)}), hole)


def times(name: str, reason: str, hole: str | None = None, **offsets: Any) -> Attack:
    """Time claims as offsets from now (numbers) or as given (anything else)."""

    def make(path: str) -> str:
        now = int(time.time())
        values = {k: now + v if isinstance(v, (int, float)) and not isinstance(v, bool) else v for k, v in offsets.items()}
        return forge(path, claims=values)

    return token_case(name, reason, make, hole)


def literal(name: str, reason: str, value: str | bytes | None) -> Attack:
    return Attack(name, lambda path: value, reason)


NONE_SIGN = lambda message: b""  # noqa: E731
BIG = 10**400  # a JSON integer that no float can hold

ATTACKS: list[Attack] = [
    # ---- the Authorization header and the compact serialization
    literal("no Authorization header", "missing bearer token", None),
    literal("empty Authorization header", "missing bearer token", ""),
    literal("scheme only", "not a bearer token", "Bearer"),
    literal("scheme and blanks", "not a bearer token", "Bearer     "),
    Attack("Basic scheme carrying a valid token", lambda p: "Basic " + forge(p), "not a bearer token"),
    Attack("Token scheme carrying a valid token", lambda p: "Token " + forge(p), "not a bearer token"),
    Attack("no scheme, bare valid token", lambda p: forge(p), "not a bearer token"),
    Attack("two tokens in one header", lambda p: bearer(forge(p)) + " " + forge(p), "not a bearer token"),
    Attack("two tokens separated by a comma", lambda p: bearer(forge(p)) + "," + forge(p), "malformed token"),
    Attack("lower-case bearer with an alg none token", lambda p: "bearer " + forge(p, alg="none", sign=NONE_SIGN), "forbidden alg"),
    literal("not a JWT", "malformed token", "Bearer not-a-jwt"),
    literal("three garbage segments", "malformed token", "Bearer a.b.c"),
    literal("three empty segments", "malformed token", "Bearer .."),
    token_case("two segments (no signature part)", "malformed token", lambda p: forge(p).rsplit(".", 1)[0]),
    token_case("four segments", "malformed token", lambda p: forge(p) + "." + forge(p).split(".")[2]),
    token_case("trailing dot", "malformed token", lambda p: forge(p) + "."),
    token_case("leading dot", "malformed token", lambda p: "." + forge(p)),
    token_case("JWE compact form (5 parts)", "malformed token", jwe_like),
    token_case("padding on the signature (RSA, '==')", "malformed token", rsa_token_with_padded_signature, "compact-form"),
    token_case("padding on the header segment", "malformed token", lambda p: padded_header(forge(p)), "compact-form"),
    token_case("base64 '+/' instead of base64url '-_'", "malformed token", with_url_alphabet_swapped),
    token_case("tab inside the signature", "malformed token", lambda p: (lambda t: t[:-10] + "\t" + t[-10:])(forge(p))),
    Attack("non-ASCII byte after the token", lambda p: bearer(forge(p)).encode() + b"\xff", "malformed token"),
    token_case("oversized token (100 KB)", "token too large", lambda p: forge(p, claims={"pad": "x" * 100_000})),
    token_case("header not JSON", "malformed token", lambda p: f"{b64url(b'not json')}.{forge(p).split('.', 1)[1]}"),
    token_case("header a JSON array", "malformed token", lambda p: with_json(p, header_text='["ES384"]')),
    token_case("claims a JSON array", "malformed token", lambda p: with_json(p, claims_text="[1, 2]")),
    token_case("claims not UTF-8", "malformed token", lambda p: with_json(p, claims_text=b"\xff\xfe{}")),
    token_case("claims in UTF-16 (parser differential)", "malformed token", lambda p: with_json(p, claims_text=json.dumps(claims_for(p)).encode("utf-16")), "json-parsing"),
    token_case("header nested 2,000 deep", "malformed token", lambda p: with_json(p, header_text='{"alg":"ES384","kid":"ec-1","x":' + nested(2000) + "}")),
    token_case("claims nested 2,000 deep", "malformed token", lambda p: with_json(p, claims_text='{"iss":"' + EHR + '","x":' + nested(2000) + "}"), "json-parsing"),
    # ---- alg
    forged("alg none", "forbidden alg", alg="none", sign=NONE_SIGN),
    forged("alg None", "forbidden alg", alg="None", sign=NONE_SIGN),
    forged("alg NONE", "forbidden alg", alg="NONE", sign=NONE_SIGN),
    forged("alg nOnE with a garbage signature", "forbidden alg", alg="nOnE", sign=lambda m: b"x" * 96),
    token_case("alg missing", "forbidden alg", lambda p: compact({"typ": "JWT", "kid": "ec-1"}, claims_for(p), signer("ES384", EC_KEY))),
    forged("alg empty", "alg not allowed for this client", alg="", sign=signer("ES384", EC_KEY)),
    token_case("alg not a string", "forbidden alg", lambda p: compact({"alg": ["ES384"], "typ": "JWT", "kid": "ec-1"}, claims_for(p), signer("ES384", EC_KEY))),
    forged("HS256 keyed with the public key PEM (key confusion)", "forbidden alg", alg="HS256", sign=hmac_signer(hashlib.sha256, public_pem(EC_KEY))),
    forged("HS384 keyed with the public key PEM (key confusion)", "forbidden alg", alg="HS384", sign=hmac_signer(hashlib.sha384, public_pem(EC_KEY))),
    forged("HS384 keyed with the RSA public key DER", "forbidden alg", alg="HS384", kid="rsa-1", sign=hmac_signer(hashlib.sha384, public_der(RSA_KEY))),
    forged("HS512 keyed with the JWK JSON text", "forbidden alg", alg="HS512", sign=hmac_signer(hashlib.sha512, json.dumps(A_JWKS["keys"][0]).encode())),
    forged("HS256 with an empty secret", "forbidden alg", alg="HS256", sign=hmac_signer(hashlib.sha256, b"")),
    forged("hs256 (lower case) with an empty secret", "forbidden alg", alg="hs256", sign=hmac_signer(hashlib.sha256, b"")),
    forged("ES256 (client allows ES384, RS384)", "alg not allowed for this client", alg="ES256", key=ATTACKER_P256),
    forged("ES512", "alg not allowed for this client", alg="ES512", key=ATTACKER_P521),
    forged("RS256 with the client's RSA kid", "alg not allowed for this client", alg="RS256", kid="rsa-1", key=RSA_KEY),
    forged("PS384 with the client's RSA kid", "alg not allowed for this client", alg="PS384", kid="rsa-1", key=RSA_KEY),
    forged("EdDSA", "alg not allowed for this client", alg="EdDSA", key=ATTACKER_ED),
    forged("es384 (alg names are case-sensitive)", "alg not allowed for this client", alg="es384", sign=signer("ES384", EC_KEY)),
    forged("'ES384 ' with a trailing blank", "alg not allowed for this client", alg="ES384 ", sign=signer("ES384", EC_KEY)),
    forged("RS384 on the EC key's kid", "key does not fit alg", alg="RS384", key=RSA_KEY, kid="ec-1"),
    forged("ES384 on the RSA key's kid", "key does not fit alg", alg="ES384", kid="rsa-1"),
    # ---- keys named by the token: jwk, jku, x5u, x5c, kid
    forged("jwk header with the attacker's key, attacker-signed", "unsupported header parameter", "header-params",
           key=ATTACKER_EC, header={"jwk": public_jwk(ATTACKER_EC, "ec-1", "ES384")}),
    forged("jwk header with the attacker's key and kid", "unsupported header parameter", "header-params",
           key=ATTACKER_EC, kid="attacker", header={"jwk": public_jwk(ATTACKER_EC, "attacker", "ES384")}),
    forged("jwk header on a token the client signed", "unsupported header parameter", "header-params",
           header={"jwk": public_jwk(ATTACKER_EC, "ec-1", "ES384")}),
    forged("jku to an attacker URL", "jku not allowed", key=ATTACKER_EC, kid="attacker", header={"jku": ATTACKER_JKU}),
    forged("jku empty", "jku not allowed", header={"jku": ""}),
    forged("jku not a string", "jku not allowed", header={"jku": [ATTACKER_JKU]}),
    forged("x5u to an attacker URL", "unsupported header parameter", "header-params", key=ATTACKER_EC, header={"x5u": "https://attacker.example/cert.pem"}),
    forged("x5u on a token the client signed", "unsupported header parameter", "header-params", header={"x5u": "https://attacker.example/cert.pem"}),
    token_case("x5c with the attacker's certificate", "unsupported header parameter",
               lambda p: forge(p, key=ATTACKER_EC, header={"x5c": [self_signed_certificate_b64(ATTACKER_EC)]}), "header-params"),
    token_case("x5c on a token the client signed", "unsupported header parameter",
               lambda p: forge(p, header={"x5c": [self_signed_certificate_b64(ATTACKER_EC)]}), "header-params"),
    forged("kid missing", "missing kid", kid=DROP),
    forged("kid empty", "missing kid", kid=""),
    forged("kid null", "malformed token", kid=None),
    forged("kid a number", "malformed token", kid=1),
    forged("kid path traversal", "unknown kid", kid="../../../../etc/passwd"),
    forged("kid path traversal to the key file", "unknown kid", kid="../tests/keys/sandbox-ecprivkey.pem"),
    forged("kid SQL injection", "unknown kid", kid="' OR '1'='1' --"),
    forged("kid with a NUL and a newline", "unknown kid", kid="ec-1\x00\nFAKE LOG LINE"),
    forged("kid 5,000 characters", "unknown kid", kid="k" * 5000),
    forged("kid 'ec-1 ' (trailing blank)", "unknown kid", kid="ec-1 "),
    forged("kid of client B's key, signed by B, iss A", "unknown kid", kid="b-only", key=B_ONLY_KEY),
    forged("kid shared with client B, signed by B's key, iss A", "bad signature", key=B_KEY),
    forged("signed by client A, iss client B", "bad signature", claims={"iss": EHR_B}),
    forged("crit with an unknown extension", "malformed token", header={"crit": ["exp-x"], "exp-x": 1}),
    forged("crit naming a missing parameter", "malformed token", header={"crit": ["exp-x"]}),
    forged("crit empty", "malformed token", header={"crit": []}),
    forged("crit not a list", "malformed token", header={"crit": "b64"}),
    forged("crit b64 (understood by PyJWT, not by CDS Hooks)", "unsupported header parameter", "header-params", header={"crit": ["b64"], "b64": True}),
    forged("b64 false (unencoded payload)", "malformed token", header={"crit": ["b64"], "b64": False}),
    forged("b64 true without crit", "unsupported header parameter", "header-params", header={"b64": True}),
    forged("typ at+jwt", "typ is not JWT", header={"typ": "at+jwt"}),
    forged("typ JWS", "typ is not JWT", header={"typ": "JWS"}),
    forged("typ JOSE+JSON", "typ is not JWT", header={"typ": "JOSE+JSON"}),
    forged("typ empty", "typ is not JWT", header={"typ": ""}),
    forged("typ a number", "typ is not JWT", header={"typ": 1}),
    # ---- iss, sub, jti, tenant
    claim("iss missing", "missing iss", iss=DROP),
    claim("iss empty", "missing iss", iss=""),
    claim("iss null", "missing iss", iss=None),
    claim("iss a number", "missing iss", iss=1),
    claim("iss an array", "missing iss", iss=[EHR]),
    claim("iss unknown", "unknown issuer", iss="https://evil.example"),
    claim("iss with a trailing slash", "unknown issuer", iss=EHR + "/"),
    claim("iss upper-case host", "unknown issuer", iss=EHR.upper()),
    claim("iss with a trailing blank", "unknown issuer", iss=EHR + " "),
    claim("sub empty", "sub is empty", "claim-types", sub=""),
    claim("sub a number", "sub is not a string", "claim-types", sub=12345),
    claim("sub null", "sub is not a string", "claim-types", sub=None),
    claim("sub an object", "sub is not a string", "claim-types", sub={"id": "x"}),
    claim("jti missing", "missing jti", jti=DROP),
    claim("jti empty", "missing jti", jti=""),
    claim("jti null", "missing jti", jti=None),
    claim("jti a number", "missing jti", jti=12345),
    claim("jti an array", "missing jti", jti=["a"]),
    claim("tenant a number", "tenant is not a string", tenant=1),
    claim("tenant empty", "tenant is empty", "claim-types", tenant=""),
    # ---- aud
    claim("aud missing", "missing aud", aud=DROP),
    aud("aud null", lambda p: None),
    aud("aud empty", lambda p: ""),
    aud("aud a number", lambda p: 1),
    aud("aud an object", lambda p: {"url": PUBLIC_BASE + p}),
    aud("aud empty array", lambda p: []),
    aud("aud array of a number", lambda p: [1]),
    aud("aud array without our URL", lambda p: ["https://other.example/cds-services"]),
    aud("aud array: ours and another audience", lambda p: [PUBLIC_BASE + p, "https://other-cds.example/cds-services"], hole="aud-single"),
    aud("aud array: another audience and ours", lambda p: ["https://other-cds.example/cds-services", PUBLIC_BASE + p], hole="aud-single"),
    aud("aud array: ours twice", lambda p: [PUBLIC_BASE + p, PUBLIC_BASE + p], hole="aud-single"),
    aud("aud of another service", lambda p: PUBLIC_BASE + "/cds-services/another-service"),
    aud("aud of discovery (on the services) / of the service (on discovery)", lambda p: PUBLIC_BASE + (SERVICE if p == DISCOVERY else DISCOVERY)),
    aud("aud of feedback (on the others) / of the service (on feedback)", lambda p: PUBLIC_BASE + (SERVICE if p == FEEDBACK else FEEDBACK)),
    aud("aud http instead of https", lambda p: "http://cds.example.org" + p),
    aud("aud other host", lambda p: "https://cds.example.com" + p),
    aud("aud sub-domain", lambda p: "https://evil.cds.example.org" + p),
    aud("aud host with a trailing dot", lambda p: "https://cds.example.org." + p),
    aud("aud upper-case host", lambda p: "https://CDS.EXAMPLE.ORG" + p),
    aud("aud explicit default port", lambda p: "https://cds.example.org:443" + p),
    aud("aud other port", lambda p: "https://cds.example.org:8443" + p),
    aud("aud with userinfo", lambda p: "https://ehr@cds.example.org" + p),
    aud("aud prefix (base URL only)", lambda p: PUBLIC_BASE),
    aud("aud path prefix", lambda p: PUBLIC_BASE + p[:-3]),
    aud("aud extra path segment", lambda p: PUBLIC_BASE + p + "/x"),
    aud("aud with a trailing slash", lambda p: PUBLIC_BASE + p + "/", hole="aud-exact"),
    aud("aud with a double slash", lambda p: PUBLIC_BASE + "/" + p),
    aud("aud with a query", lambda p: PUBLIC_BASE + p + "?x=1"),
    aud("aud with an empty query", lambda p: PUBLIC_BASE + p + "?"),
    aud("aud with a fragment", lambda p: PUBLIC_BASE + p + "#x"),
    aud("aud percent-encoded", lambda p: PUBLIC_BASE + p.replace("-", "%2D").replace("/cds", "/%63ds")),
    aud("aud with dot segments", lambda p: PUBLIC_BASE + "/x/.." + p),
    aud("aud with a trailing blank", lambda p: PUBLIC_BASE + p + " "),
    # ---- exp, iat, nbf
    claim("exp missing", "missing exp", exp=DROP),
    claim("exp null", "missing exp", exp=None),
    times("exp a string", "exp is not a number", exp="never"),
    times("exp a numeric string", "exp is not a number", exp=str(int(time.time()) + 300)),
    times("exp true", "exp is not a number", exp=True),
    times("exp false", "exp is not a number", exp=False),
    times("exp an array", "exp is not a number", exp=[1]),
    claim("exp 400-digit integer", "exp is not a number", "numeric-date-overflow", exp=BIG),
    claim("exp 1e308", "lifetime too long", exp=1e308),
    claim("exp -1e308", "expired", exp=-1e308),
    times("exp 61 s in the past (beyond the 60 s skew)", "expired", iat=-361, exp=-61),
    times("exp long past", "expired", iat=-86_400, exp=-86_100),
    claim("exp epoch 0", "expired", iat=0, exp=0),
    times("lifetime one hour", "lifetime too long", exp=3600),
    times("lifetime 5 min + skew + 1 s", "lifetime too long", iat=0, exp=361),
    times("lifetime 5 min + 2 s", "lifetime too long", "lifetime-skew", iat=0, exp=302),
    times("lifetime 5 min + 59 s", "lifetime too long", "lifetime-skew", iat=-100, exp=259),
    times("lifetime a year", "lifetime too long", exp=365 * 86_400),
    times("exp before iat", "exp before iat", iat=0, exp=-10),
    claim("iat missing", "missing iat", iat=DROP),
    times("iat a string", "iat is not a number", iat="now"),
    times("iat true", "iat is not a number", iat=True),
    claim("iat 400-digit integer", "iat is not a number", "numeric-date-overflow", iat=BIG),
    times("iat 61 s in the future", "iat in the future", iat=61, exp=300),
    times("iat a day in the future", "iat in the future", iat=86_400, exp=86_700),
    times("nbf 61 s in the future", "not yet valid (nbf)", nbf=61),
    times("nbf a string", "not yet valid (nbf)", nbf="later"),
    times("nbf true", "not yet valid (nbf)", nbf=True),
    times("nbf null", "not yet valid (nbf)", "claim-types", nbf=None),
    claim("nbf 400-digit integer", "not yet valid (nbf)", "numeric-date-overflow", nbf=BIG),
    # ---- signature
    forged("signed by the attacker's key, client's kid", "bad signature", key=ATTACKER_EC),
    forged("signed by the client's RSA key under the EC kid's alg", "key does not fit alg", alg="RS384", key=RSA_KEY),
    forged("empty signature", "bad signature", sign=NONE_SIGN),
    forged("signature of zeros (r = s = 0)", "bad signature", sign=lambda m: b"\x00" * 96),
    forged("signature r = s = n (the group order)", "bad signature", sign=lambda m: P384_ORDER.to_bytes(48, "big") * 2),
    forged("signature truncated to 95 bytes", "bad signature", sign=lambda m: ALGORITHMS["ES384"].sign(m, EC_KEY)[:95]),
    forged("signature with a byte appended", "bad signature", sign=lambda m: ALGORITHMS["ES384"].sign(m, EC_KEY) + b"\x00"),
    token_case("ES384 signature in DER, not raw R||S", "bad signature", lambda p: der_signature(forge(p))),
    token_case("payload swapped under a valid signature", "bad signature",
               lambda p: "{0}.{3}.{2}".format(*forge(p).split("."), forge(p).split(".")[1])),
    token_case("header swapped under a valid signature", "bad signature",
               lambda p: b64url(json.dumps(header_of(x="y")).encode()) + "." + forge(p).split(".", 1)[1]),
    token_case("signature of the payload alone", "bad signature",
               lambda p: (lambda t: with_signature(t, ALGORITHMS["ES384"].sign(t.split(".")[1].encode(), EC_KEY)))(forge(p))),
    # ---- duplicate JSON member names (RFC 7515 4 / RFC 7519 4: reject, or use the last: we reject)
    token_case("two alg: HS256 first, ES384 last", "duplicate JSON member", lambda p: with_json(p, header_text=duplicate_first(header_of(), "alg", "HS256")), "duplicate-members"),
    token_case("two alg: ES384 first, none last", "duplicate JSON member", lambda p: with_json(p, header_text=duplicate_last(header_of(), "alg", "none")), "duplicate-members"),
    token_case("two kid", "duplicate JSON member", lambda p: with_json(p, header_text=duplicate_first(header_of(), "kid", "../etc/passwd")), "duplicate-members"),
    token_case("two typ", "duplicate JSON member", lambda p: with_json(p, header_text=duplicate_first(header_of(), "typ", "at+jwt")), "duplicate-members"),
    token_case("two aud: another first, ours last", "duplicate JSON member", lambda p: with_json(p, claims_text=duplicate_first(claims_for(p), "aud", "https://other-cds.example/cds-services")), "duplicate-members"),
    token_case("two aud: ours first, another last", "duplicate JSON member", lambda p: with_json(p, claims_text=duplicate_last(claims_for(p), "aud", "https://other-cds.example/cds-services")), "duplicate-members"),
    token_case("two iss", "duplicate JSON member", lambda p: with_json(p, claims_text=duplicate_first(claims_for(p), "iss", EHR_B)), "duplicate-members"),
    token_case("two exp: a year first", "duplicate JSON member", lambda p: with_json(p, claims_text=duplicate_first(claims_for(p), "exp", int(time.time()) + 365 * 86_400)), "duplicate-members"),
    token_case("two jti", "duplicate JSON member", lambda p: with_json(p, claims_text=duplicate_first(claims_for(p), "jti", "fixed-jti")), "duplicate-members"),
    token_case("duplicate inside a nested claim", "duplicate JSON member", lambda p: with_json(p, claims_text=json.dumps(claims_for(p))[:-1] + ', "ext": {"a": 1, "a": 2}}'), "duplicate-members"),
]


def _params() -> list[Any]:
    params = []
    for attack in ATTACKS:
        marks = [pytest.mark.xfail(strict=True, reason=HOLES[attack.hole])] if attack.hole in OPEN_HOLES else []
        for method, path in ENDPOINTS:
            params.append(pytest.param(attack, method, path, marks=marks, id=f"{attack.name} [{method} {path}]"))
    return params


def test_attack_names_are_unique() -> None:
    names = [attack.name for attack in ATTACKS]
    assert len(names) == len(set(names))
    assert all(attack.hole is None or attack.hole in HOLES for attack in ATTACKS) and OPEN_HOLES <= set(HOLES)


# --------------------------------------------------------------------------------------------
# The service in-process: two clients, a real clients file, the real SQLite replay cache


def write_clients(directory: Path, clients: list[dict[str, Any]]) -> str:
    path = directory / "clients.json"
    path.write_text(json.dumps({"clients": clients}), encoding="utf-8")
    return str(path)


STANDARD_CLIENTS = [{"issuer": EHR, "jwks": A_JWKS}, {"issuer": EHR_B, "jwks": B_JWKS}]


@pytest.fixture(scope="module")
def http(tmp_path_factory) -> Iterator[TestClient]:
    directory = tmp_path_factory.mktemp("attacks")
    settings = Settings(
        clients_file=write_clients(directory, STANDARD_CLIENTS),
        public_base_url=PUBLIC_BASE,
        database_url=f"sqlite:///{directory / 'cds.db'}",
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def send(http: TestClient, method: str, path: str, authorization: str | bytes | None) -> httpx.Response:
    headers = {"Authorization": authorization} if authorization is not None else {}
    return http.request(method, path, headers=headers, content=b"{}")


def refusal_reasons(caplog: pytest.LogCaptureFixture) -> list[str]:
    reasons = []
    for record in caplog.records:
        match = re.match(r"JWT refused: (.+?)(?: \((?:iss|tenant|jti#)=.*\))?$", record.getMessage())
        if record.name == "cds_service.auth" and match:
            reasons.append(match.group(1))
    return reasons


def token_fragments(authorization: str | bytes | None) -> list[str]:
    """Pieces of the presented token that must never appear in a body or a log line."""
    text = authorization.decode("latin-1") if isinstance(authorization, bytes) else authorization or ""
    pieces = [piece for piece in re.split(r"[\s.,]+", text) if len(piece) >= 16]
    return [piece[:24] for piece in pieces] + [piece[-24:] for piece in pieces]


@pytest.fixture(scope="module")
def bare_401(http: TestClient) -> httpx.Response:
    response = http.get(DISCOVERY)
    assert response.status_code == 401
    return response


def assert_bare_401(response: httpx.Response, bare: httpx.Response, authorization: Any) -> None:
    assert response.status_code == 401, response.text[:300]
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ") and "error_description" not in challenge
    assert response.content == bare.content  # the same bare body whatever was wrong
    assert response.headers["content-type"] == "application/json"
    for piece in token_fragments(authorization):
        assert piece not in response.text and piece not in str(response.headers)


@pytest.mark.parametrize(("attack", "method", "path"), _params())
def test_forged_token_is_refused(http: TestClient, bare_401: httpx.Response, caplog: pytest.LogCaptureFixture, attack: Attack, method: str, path: str) -> None:
    authorization = attack.authorization(path)
    caplog.set_level(logging.DEBUG)
    response = send(http, method, path, authorization)
    assert_bare_401(response, bare_401, authorization)
    assert refusal_reasons(caplog) == [attack.reason]
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "eyJ" not in logged
    for piece in token_fragments(authorization):
        assert piece not in logged
    assert "\n" not in "".join(record.getMessage() for record in caplog.records if record.name == "cds_service.auth")


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_the_unaltered_forgery_is_accepted(http: TestClient, method: str, path: str) -> None:
    # every attack is this token with one thing changed: so each refusal is due to the attack
    for token in (forge(path), forge(path, key=RSA_KEY, alg="RS384", kid="rsa-1"), forge(path, claims={"iss": EHR_B}, key=B_KEY)):
        response = send(http, method, path, bearer(token))
        assert response.status_code == (200 if method == "GET" else 400), response.text  # POSTs: authenticated, then the {} body is refused


def test_legitimate_variations_are_accepted(http: TestClient) -> None:
    """What RFC 7519 and CDS Hooks allow must keep working: only the attacks are refused."""
    now = time.time()
    accepted = {
        "aud as a one-element array": forge(DISCOVERY, claims={"aud": [PUBLIC_BASE + DISCOVERY]}),
        "float NumericDates": forge(DISCOVERY, claims={"iat": now, "exp": now + 299.5, "nbf": now - 0.5}),
        "typ jwt (case-insensitive)": forge(DISCOVERY, header={"typ": "jwt"}),
        "no typ": forge(DISCOVERY, header={"typ": DROP}),
        "sub and tenant as strings (Epic)": forge(DISCOVERY, claims={"sub": "epic-client-id", "tenant": "hospital-a"}),
        "expired 30 s ago (within the 60 s skew)": forge(DISCOVERY, claims={"iat": int(now) - 330, "exp": int(now) - 30}),
        "lifetime 301 s (exp and iat rounded apart)": forge(DISCOVERY, claims={"iat": int(now), "exp": int(now) + 301}),
        "iat 59 s ahead (within the skew)": forge(DISCOVERY, claims={"iat": int(now) + 59, "exp": int(now) + 359}),
        "x5t thumbprint header (not a key)": forge(DISCOVERY, header={"x5t#S256": b64url(hashlib.sha256(b"cert").digest())}),
    }
    for name, token in accepted.items():
        assert http.get(DISCOVERY, headers={"Authorization": bearer(token)}).status_code == 200, name
    # RFC 7235: the auth scheme is case-insensitive
    for scheme in ("bearer", "BEARER", "bEaReR"):
        assert http.get(DISCOVERY, headers={"Authorization": f"{scheme} {forge(DISCOVERY)}"}).status_code == 200, scheme


def test_every_endpoint_requires_the_token(http: TestClient, bare_401: httpx.Response) -> None:
    others = [("HEAD", DISCOVERY), ("POST", f"/cds-services/{SIGN}/feedback"), ("POST", "/cds-services/no-such-service"), ("POST", "/cds-services/no-such-service/feedback")]
    for method, path in [*ENDPOINTS, *others]:
        response = http.request(method, path, content=b"{}")
        assert response.status_code == 401, (method, path)
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="cds-services"'
        if method != "HEAD":
            assert response.content == bare_401.content


def test_token_in_a_query_parameter_is_ignored(http: TestClient) -> None:
    for name in ("access_token", "token", "jwt", "authorization"):
        response = http.get(DISCOVERY, params={name: forge(DISCOVERY)})
        assert response.status_code == 401 and response.headers["WWW-Authenticate"] == 'Bearer realm="cds-services"'


# --------------------------------------------------------------------------------------------
# Replay: the key is (iss, jti), never the token's bytes


def test_same_token_twice(http: TestClient) -> None:
    token = bearer(forge(DISCOVERY))
    assert http.get(DISCOVERY, headers={"Authorization": token}).status_code == 200
    assert http.get(DISCOVERY, headers={"Authorization": token}).status_code == 401


def test_same_jti_in_two_different_tokens(http: TestClient) -> None:
    jti = str(uuid.uuid4())
    assert http.get(DISCOVERY, headers={"Authorization": bearer(forge(DISCOVERY, claims={"jti": jti}))}).status_code == 200
    later = forge(DISCOVERY, claims={"jti": jti, "iat": int(time.time()) + 1, "exp": int(time.time()) + 200})
    assert http.get(DISCOVERY, headers={"Authorization": bearer(later)}).status_code == 401
    rsa_signed = forge(DISCOVERY, key=RSA_KEY, alg="RS384", kid="rsa-1", claims={"jti": jti})
    assert http.get(DISCOVERY, headers={"Authorization": bearer(rsa_signed)}).status_code == 401


def test_same_jti_on_another_endpoint(http: TestClient) -> None:
    jti = str(uuid.uuid4())
    assert http.get(DISCOVERY, headers={"Authorization": bearer(forge(DISCOVERY, claims={"jti": jti}))}).status_code == 200
    for path in (SERVICE, FEEDBACK):
        assert send(http, "POST", path, bearer(forge(path, claims={"jti": jti}))).status_code == 401


def test_high_s_signature_is_the_same_token(http: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    # ECDSA signatures are malleable: (r, n - s) verifies too. The variant must count as a replay.
    caplog.set_level(logging.WARNING, logger="cds_service.auth")
    token = forge(DISCOVERY)
    assert http.get(DISCOVERY, headers={"Authorization": bearer(token)}).status_code == 200
    assert http.get(DISCOVERY, headers={"Authorization": bearer(high_s(token))}).status_code == 401
    other = forge(DISCOVERY)  # the other order: the malleated one first
    assert http.get(DISCOVERY, headers={"Authorization": bearer(high_s(other))}).status_code == 200
    assert http.get(DISCOVERY, headers={"Authorization": bearer(other)}).status_code == 401
    assert refusal_reasons(caplog) == ["replayed jti", "replayed jti"]


def test_same_jti_for_two_clients_is_not_a_replay(http: TestClient) -> None:
    jti = str(uuid.uuid4())
    assert http.get(DISCOVERY, headers={"Authorization": bearer(forge(DISCOVERY, claims={"jti": jti}))}).status_code == 200
    b_token = forge(DISCOVERY, key=B_KEY, claims={"jti": jti, "iss": EHR_B})
    assert http.get(DISCOVERY, headers={"Authorization": bearer(b_token)}).status_code == 200


def test_refused_token_does_not_burn_the_jti(http: TestClient) -> None:
    # otherwise an attacker who sees a jti (not the token) could deny the EHR's call
    jti = str(uuid.uuid4())
    assert http.get(DISCOVERY, headers={"Authorization": bearer(forge(DISCOVERY, key=ATTACKER_EC, claims={"jti": jti}))}).status_code == 401
    assert http.get(DISCOVERY, headers={"Authorization": bearer(forge(DISCOVERY, claims={"jti": jti}))}).status_code == 200


# --------------------------------------------------------------------------------------------
# jku: forged key-set URLs are never fetched (real loopback HTTP servers record every request)


class RecordingServer:
    """A loopback HTTP server: path -> (status, headers, body); records every request path."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                recorder.requests.append(self.path)
                status, headers, body = recorder.routes.get(self.path, (404, {}, b""))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def serve_json(self, path: str, document: Any) -> None:
        self.routes[path] = (200, {"Content-Type": "application/json"}, json.dumps(document).encode())

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


JKU_EHR = "https://jku-ehr.example.org"  # a client whose keys come only from its allow-listed jku URLs


@pytest.fixture(scope="module")
def jku_world(tmp_path_factory) -> Iterator[tuple[TestClient, RecordingServer, RecordingServer]]:
    ehr_host, attacker = RecordingServer(), RecordingServer()
    attacker_set = {"keys": [public_jwk(ATTACKER_EC, "ec-1", "ES384"), public_jwk(ATTACKER_EC, "attacker", "ES384")]}
    ehr_host.serve_json("/jwks.json", {"keys": [public_jwk(EC_KEY, "ec-1", "ES384")]})
    ehr_host.serve_json("/evil.json", attacker_set)  # an attacker-controlled file on the EHR's host, not allow-listed
    ehr_host.routes["/moved.json"] = (302, {"Location": attacker.base + "/jwks.json"}, b"")
    attacker.serve_json("/jwks.json", attacker_set)
    directory = tmp_path_factory.mktemp("jku")
    clients = [{"issuer": JKU_EHR, "jku_allowlist": [ehr_host.base + "/jwks.json", ehr_host.base + "/moved.json"]}]
    settings = Settings(clients_file=write_clients(directory, clients), public_base_url=PUBLIC_BASE, database_url=f"sqlite:///{directory / 'cds.db'}")
    try:
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            yield client, ehr_host, attacker
    finally:
        ehr_host.close()
        attacker.close()


def jku_variants(ehr: str, attacker: str) -> dict[str, str]:
    port = int(ehr.rsplit(":", 1)[1])
    return {
        "attacker URL": attacker + "/jwks.json",
        "allow-listed host, other file": ehr + "/evil.json",
        "dot-dot segment": ehr + "/x/../evil.json",
        "dot-dot after the allowed path": ehr + "/jwks.json/../evil.json",
        "percent-encoded dot-dot": ehr + "/%2e%2e/evil.json",
        "percent-encoded slash": ehr + "/jwks.json%2F..%2Fevil.json",
        "userinfo trick (allowed host as user)": f"http://127.0.0.1:{port}@{attacker[len('http://'):]}/jwks.json",
        "backslash trick": f"{attacker}\\@127.0.0.1:{port}/jwks.json",
        "other port": f"http://127.0.0.1:{port + 1 if port < 65535 else port - 1}/jwks.json",
        "https instead of http": ehr.replace("http://", "https://") + "/jwks.json",
        "localhost instead of 127.0.0.1": f"http://localhost:{port}/jwks.json",
        "trailing dot in host": f"http://localhost.:{port}/jwks.json",
        "upper-case scheme": ehr.replace("http://", "HTTP://") + "/jwks.json",
        "query appended": ehr + "/jwks.json?x=1",
        "fragment appended": ehr + "/jwks.json#",
        "double slash": ehr + "//jwks.json",
        "trailing slash": ehr + "/jwks.json/",
        "encoded path": ehr + "/%6Awks.json",
    }


def test_jku_allow_listed_url_works(jku_world) -> None:
    http, ehr_host, attacker = jku_world
    token = forge(DISCOVERY, header={"jku": ehr_host.base + "/jwks.json"}, claims={"iss": JKU_EHR})
    assert http.get(DISCOVERY, headers={"Authorization": bearer(token)}).status_code == 200
    assert ehr_host.requests == ["/jwks.json"] and attacker.requests == []


def test_forged_jku_is_never_fetched(jku_world, caplog: pytest.LogCaptureFixture) -> None:
    http, ehr_host, attacker = jku_world
    before = list(ehr_host.requests)
    caplog.set_level(logging.WARNING, logger="cds_service.auth")
    for name, url in jku_variants(ehr_host.base, attacker.base).items():
        for kid in ("ec-1", "attacker"):
            token = forge(DISCOVERY, key=ATTACKER_EC, kid=kid, header={"jku": url}, claims={"iss": JKU_EHR})
            response = http.get(DISCOVERY, headers={"Authorization": bearer(token)})
            assert response.status_code == 401, name
    assert set(refusal_reasons(caplog)) == {"jku not allowed"}
    assert attacker.requests == [] and ehr_host.requests == before


def test_allow_listed_jku_that_redirects_is_not_followed(jku_world) -> None:
    http, ehr_host, attacker = jku_world
    token = forge(DISCOVERY, key=ATTACKER_EC, kid="attacker", header={"jku": ehr_host.base + "/moved.json"}, claims={"iss": JKU_EHR})
    assert http.get(DISCOVERY, headers={"Authorization": bearer(token)}).status_code == 401
    assert "/moved.json" in ehr_host.requests and attacker.requests == []


def test_attacker_key_under_an_allow_listed_jku(jku_world) -> None:
    # the jku is the EHR's, the kid is one the EHR has, the signature is the attacker's
    http, ehr_host, _ = jku_world
    token = forge(DISCOVERY, key=ATTACKER_EC, header={"jku": ehr_host.base + "/jwks.json"}, claims={"iss": JKU_EHR})
    assert http.get(DISCOVERY, headers={"Authorization": bearer(token)}).status_code == 401


def test_unknown_issuer_with_a_jku_causes_no_request(jku_world) -> None:
    http, ehr_host, attacker = jku_world
    before = list(ehr_host.requests)
    for jku in (attacker.base + "/jwks.json", ehr_host.base + "/jwks.json"):
        token = forge(DISCOVERY, key=ATTACKER_EC, kid="fresh-kid", header={"jku": jku}, claims={"iss": "https://evil.example"})
        assert http.get(DISCOVERY, headers={"Authorization": bearer(token)}).status_code == 401
    assert attacker.requests == [] and ehr_host.requests == before


# --------------------------------------------------------------------------------------------
# The real server (uvicorn over TCP): header-level tricks


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Any]:
    directory = tmp_path_factory.mktemp("live-attacks")
    env = {"CDS_CLIENTS_FILE": write_clients(directory, STANDARD_CLIENTS), "CDS_PUBLIC_BASE_URL": PUBLIC_BASE, "CDS_LOG_LEVEL": "DEBUG"}
    with live_server(directory, env=env) as base_url:
        yield base_url


def raw_request(port: int, head: bytes, timeout: float = 10.0) -> tuple[int | None, float]:
    """Send raw bytes; the status code of the answer (None: the connection was closed) and the time taken."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(head)
        except OSError:
            pass  # the server may close while we still send a 10 MB header
        data = b""
        try:
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
    match = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return (int(match.group(1)) if match else None), time.monotonic() - started


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send one raw request (with Connection: close) and read the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("size", [100_000, 10_000_000], ids=["100KB", "10MB"])
def test_huge_authorization_header_is_refused_quickly(server, size: int) -> None:
    head = b"GET /cds-services HTTP/1.1\r\nHost: cds.example.org\r\nAuthorization: Bearer " + b"A" * size + b"\r\n\r\n"
    status, elapsed = raw_request(server.port, head)
    assert status in (400, 401, 413, 431) and elapsed < 5.0
    assert server.process.poll() is None
    assert httpx.get(server + "/healthz").status_code == 200


def test_attack_table_over_tcp(server) -> None:
    """The whole table once more through uvicorn and TCP (discovery): same bare 401, same reasons, in order."""
    bare = httpx.get(server + DISCOVERY)
    attacks = [attack for attack in ATTACKS if attack.hole not in OPEN_HOLES]
    time.sleep(0.2)
    start = len(server.log_text())
    for attack in attacks:
        authorization = attack.authorization(DISCOVERY)
        value = authorization.encode("latin-1") if isinstance(authorization, str) else authorization
        head = b"GET /cds-services HTTP/1.1\r\nHost: cds.example.org\r\nConnection: close\r\n"
        answer = raw_exchange(server.port, head + (b"Authorization: " + value + b"\r\n" if value is not None else b"") + b"\r\n")
        status_line, _, rest = answer.partition(b"\r\n")
        headers, _, body = rest.partition(b"\r\n\r\n")
        assert status_line.startswith(b"HTTP/1.1 401 "), (attack.name, status_line)
        assert body == bare.content and b"\r\nwww-authenticate: bearer " in b"\r\n" + headers.lower(), attack.name
    time.sleep(0.2)
    log_text = server.log_text()
    reasons = re.findall(r"JWT refused: (.+?)(?: \((?:iss|tenant|jti#)=.*\))?$", log_text[start:], flags=re.MULTILINE)
    assert reasons == [attack.reason for attack in attacks]
    assert "eyJ" not in log_text


def test_host_header_naming_another_service_does_not_help(server) -> None:
    # a token the EHR issued to another CDS service, replayed to us under that service's Host: with
    # CDS_PUBLIC_BASE_URL set the audience does not come from the Host header
    for host, aud in [("other-cds.example", "http://other-cds.example/cds-services"), ("cds.example.org", "http://cds.example.org/cds-services")]:
        token = forge(DISCOVERY, claims={"aud": aud})
        assert httpx.get(server + DISCOVERY, headers={"Authorization": bearer(token), "Host": host}).status_code == 401


def test_huge_valid_looking_token_is_refused_quickly(server) -> None:
    token = forge(DISCOVERY, claims={"pad": "x" * 10_000_000})
    started = time.monotonic()
    response = httpx.get(server + DISCOVERY, headers={"Authorization": bearer(token)}, timeout=30)
    assert response.status_code in (400, 401, 413, 431) and time.monotonic() - started < 5.0
    assert httpx.get(server + "/healthz").status_code == 200


def test_lower_case_scheme_over_tcp(server) -> None:
    assert httpx.get(server + DISCOVERY, headers={"Authorization": "bearer " + forge(DISCOVERY)}).status_code == 200
    assert httpx.get(server + DISCOVERY, headers={"Authorization": "bearer " + forge(DISCOVERY, key=ATTACKER_EC)}).status_code == 401


def test_token_in_the_query_over_tcp(server) -> None:
    response = httpx.get(server + DISCOVERY, params={"access_token": forge(DISCOVERY)})
    assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")


def test_second_authorization_header_cannot_smuggle_a_token(server) -> None:
    valid = bearer(forge(DISCOVERY))
    response = httpx.get(server + DISCOVERY, headers=[("Authorization", "Bearer garbage"), ("Authorization", valid)])
    assert response.status_code == 401


@pytest.mark.xfail("duplicate-authorization" in OPEN_HOLES, strict=True, reason=HOLES["duplicate-authorization"])
def test_two_authorization_headers_are_refused(server) -> None:
    # RFC 9110 5.3: Authorization is not a list header; two of them are ambiguous (a proxy may check the last)
    valid = bearer(forge(DISCOVERY))
    response = httpx.get(server + DISCOVERY, headers=[("Authorization", valid), ("Authorization", "Bearer garbage")])
    assert response.status_code == 401


def test_header_tricks_over_tcp(server) -> None:
    port = server.port
    valid = forge(DISCOVERY).encode()
    heads = {
        "tab between scheme and token": b"Bearer\t" + forge(DISCOVERY, key=ATTACKER_EC).encode(),
        "obs-fold continuation line": b"Bearer\r\n " + forge(DISCOVERY, key=ATTACKER_EC).encode(),
        "token split across two lines": b"Bearer " + valid[:40] + b"\r\n " + valid[40:],
        "NUL in the token": b"Bearer " + valid[:40] + b"\x00" + valid[40:],
    }
    for name, value in heads.items():
        status, _ = raw_request(port, b"GET /cds-services HTTP/1.1\r\nHost: cds.example.org\r\nAuthorization: " + value + b"\r\n\r\n")
        assert status in (400, 401), name
    assert server.process.poll() is None


def test_no_token_in_the_server_log(server) -> None:
    tokens = [forge(DISCOVERY, key=ATTACKER_EC), forge(DISCOVERY, alg="none", sign=NONE_SIGN), forge(DISCOVERY, header={"jku": ATTACKER_JKU})]
    for token in tokens:
        assert httpx.get(server + DISCOVERY, headers={"Authorization": bearer(token)}).status_code == 401
    log_text = server.log_text()
    assert "JWT refused" in log_text
    for token in tokens:
        for piece in token.split("."):
            if piece:
                assert piece[:24] not in log_text


# --------------------------------------------------------------------------------------------
# Two workers: the replay cache is the database, shared


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("two-workers")
    env = service_environment(directory, env={"CDS_CLIENTS_FILE": write_clients(directory, STANDARD_CLIENTS), "CDS_PUBLIC_BASE_URL": PUBLIC_BASE})
    port = free_port()
    with open(directory / "service.log", "w+", encoding="utf-8") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "cds_service", "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            if not wait_healthy(url, process):
                log.seek(0)
                pytest.fail("two-worker service did not start:\n" + log.read()[-3000:])
            deadline = time.monotonic() + 30
            while log_text_pids(directory / "service.log") < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)


def log_text_pids(path: Path) -> int:
    return len(set(re.findall(r"Started server process \[(\d+)\]", path.read_text(encoding="utf-8", errors="replace"))))


def _get_on_fresh_connection(url: str, authorization: str) -> int:
    with httpx.Client() as client:  # one connection each: the kernel spreads them over the workers
        return client.get(url + DISCOVERY, headers={"Authorization": authorization}, timeout=15).status_code


def test_replay_race_across_two_workers(two_workers: str) -> None:
    with ThreadPoolExecutor(max_workers=16) as pool:
        for _ in range(5):
            token = bearer(forge(DISCOVERY))
            statuses = list(pool.map(lambda _: _get_on_fresh_connection(two_workers, token), range(16)))
            assert sorted(statuses) == [200] + [401] * 15, statuses
            jti = str(uuid.uuid4())  # the same jti in sixteen different tokens
            tokens = [bearer(forge(DISCOVERY, claims={"jti": jti, "exp": int(time.time()) + 300 - n})) for n in range(16)]
            statuses = list(pool.map(lambda t: _get_on_fresh_connection(two_workers, t), tokens))
            assert sorted(statuses) == [200] + [401] * 15, statuses
