"""Authentication: JWT forms, expiry, algorithm confusion, API keys, contract error shapes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from dicom_node.config import ApiKeySettings, AuthSettings, Settings
from dicom_node.node import Node
from rest.app import Route, create_app, principal
from rest.auth import Authenticator, AuthError, AuthFailure, hash_api_key
from rest.errors import ErrorStyle

SECRET = b"s" * 48
API_KEY = "k-123-456"


def token(claims: dict[str, Any] | None = None, key: Any = SECRET, alg: str = "HS256",
          **headers: Any) -> str:
    base: dict[str, Any] = {"sub": "ris", "exp": int(time.time()) + 60, "scope": "infer read"}
    base.update(claims or {})
    return jwt.encode({k: v for k, v in base.items() if v is not None}, key, algorithm=alg,
                      headers=headers or None)


def auth(**kw: Any) -> Authenticator:
    settings = AuthSettings(api_keys=[ApiKeySettings(name="lab", key_sha256=hash_api_key(API_KEY),
                                                     group="radiology", scopes=["infer"])],
                            **kw)
    return Authenticator(settings, SECRET)


def test_bare_and_bearer_tokens() -> None:
    a = auth()
    t = token()
    assert a.authenticate(t).subject == "ris"
    p = a.authenticate(f"Bearer {t}")
    assert p.scopes == {"infer", "read"} and p.kind == "jwt"


@pytest.mark.parametrize(
    ("header", "failure"),
    [
        (None, AuthFailure.MISSING),
        ("", AuthFailure.MISSING),
        ("Bearer ", AuthFailure.MISSING),
        ("garbage", AuthFailure.INVALID),
        (token({"exp": int(time.time()) - 10}), AuthFailure.EXPIRED),
        (token({"exp": None}), AuthFailure.INVALID),  # exp is required
        (token(key=b"another-secret-of-sufficient-length-0123456789"), AuthFailure.INVALID),
        ("Api-Key wrong", AuthFailure.INVALID),
    ],
)
def test_refusals(header: str | None, failure: AuthFailure) -> None:
    with pytest.raises(AuthError) as info:
        auth().authenticate(header)
    assert info.value.failure is failure


def test_alg_none_is_refused() -> None:
    unsigned = jwt.encode({"sub": "x", "exp": int(time.time()) + 60}, key=None, algorithm="none")
    with pytest.raises(AuthError, match="not accepted"):
        auth().authenticate(unsigned)


def _rsa() -> tuple[Any, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return key, pub


def test_rs256_and_es256_with_public_keys(tmp_path: Path) -> None:
    key, pub = _rsa()
    (tmp_path / "rsa.pem").write_bytes(pub)
    a = Authenticator(AuthSettings(algorithms=["RS256"]), None, tmp_path / "rsa.pem")
    assert a.authenticate(token(key=key, alg="RS256")).subject == "ris"
    # algorithm confusion: HS256 signed with the public key as the secret
    forged = jwt.api_jws.PyJWS().encode(
        b'{"sub":"evil","exp":%d}' % (int(time.time()) + 60), key=b"x" * 32, algorithm="HS256")
    with pytest.raises(AuthError, match="not accepted"):
        a.authenticate(forged)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.pem").write_bytes(ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    e = Authenticator(AuthSettings(algorithms=["ES256"]), None, tmp_path / "ec.pem")
    assert e.authenticate(token(key=ec_key, alg="ES256")).kind == "jwt"


def test_hs256_signed_with_the_public_key_is_refused_when_both_are_allowed(
        tmp_path: Path) -> None:
    """The classic confusion: a node accepting HS256 and RS256, a token HMAC-signed with
    the (public) RSA key's PEM. HS256 is checked with the secret only, so it fails."""
    key, pub = _rsa()
    (tmp_path / "rsa.pem").write_bytes(pub)
    a = Authenticator(AuthSettings(algorithms=["HS256", "RS256"]), SECRET, tmp_path / "rsa.pem")
    assert a.authenticate(token(key=key, alg="RS256")).subject == "ris"
    assert a.authenticate(token()).subject == "ris"
    payload = b'{"sub":"evil","scope":"admin","exp":%d}' % (int(time.time()) + 60)
    # PyJWT refuses a PEM as an HMAC key when signing; sign by hand as an attacker would.
    def b64(raw: bytes) -> bytes:
        return base64.urlsafe_b64encode(raw).rstrip(b"=")

    signing = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(payload)
    forged = (signing + b"." + b64(hmac.new(pub, signing, hashlib.sha256).digest())).decode()
    with pytest.raises(AuthError) as info:
        a.authenticate(forged)
    assert info.value.failure is AuthFailure.INVALID


def test_audience_and_issuer_checked_when_configured() -> None:
    a = auth(audience="dicom-node", issuer="https://idp")
    assert a.authenticate(token({"aud": "dicom-node", "iss": "https://idp"}))
    for claims in ({"aud": "other", "iss": "https://idp"}, {"aud": "dicom-node", "iss": "x"}):
        with pytest.raises(AuthError):
            a.authenticate(token(claims))


def test_a_verified_token_is_remembered_until_it_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [time.time()]
    settings = AuthSettings()
    a = Authenticator(settings, SECRET, clock=lambda: now[0])
    decodes: list[str] = []
    real = jwt.decode
    monkeypatch.setattr(jwt, "decode", lambda t, *a_, **k: decodes.append(t) or real(t, *a_, **k))
    t = token({"exp": int(now[0]) + 30, "sub": "ris-1"})
    assert a.authenticate(t).subject == "ris-1"
    assert a.authenticate(f"Bearer {t}").subject == "ris-1"
    assert decodes == [t]  # the second time, only the clock was checked
    # a token that differs by one character is verified (and refused), never taken as known
    forged = t[:-2] + ("A" if t[-2] != "A" else "B") + t[-1]
    with pytest.raises(AuthError) as bad:
        a.authenticate(forged)
    assert bad.value.failure is AuthFailure.INVALID
    now[0] += 31  # past exp by our clock: verified again, and PyJWT says expired once it is
    monkeypatch.setattr(jwt, "decode", lambda *a_, **k: (_ for _ in ()).throw(
        jwt.ExpiredSignatureError("expired")))
    with pytest.raises(AuthError) as old:
        a.authenticate(t)
    assert old.value.failure is AuthFailure.EXPIRED
    assert t not in a._verified


def test_memory_is_trusted_only_between_nbf_and_exp(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [time.time()]
    a = Authenticator(AuthSettings(), SECRET, clock=lambda: now[0])
    t = token({"nbf": int(now[0]) - 5, "exp": int(now[0]) + 60})
    a.authenticate(t)
    assert a._verified[t][1:] == (int(now[0]) - 5, int(now[0]) + 60)
    decodes: list[str] = []
    real = jwt.decode
    monkeypatch.setattr(jwt, "decode",
                        lambda t_, *a_, **k: decodes.append(t_) or real(t_, *a_, **k))
    now[0] -= 10  # before nbf by our clock: memory is not trusted, PyJWT decides again
    a.authenticate(t)
    assert decodes == [t]


def test_remembered_tokens_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rest.auth._VERIFIED_MAX", 3)
    a = auth()
    tokens = [token({"sub": f"s{i}"}) for i in range(5)]
    for t in tokens:
        a.authenticate(t)
    assert list(a._verified) == tokens[2:]


def test_api_keys() -> None:
    p = auth().authenticate(f"Api-Key {API_KEY}")
    assert (p.subject, p.group, p.scopes) == ("lab", "radiology", {"infer"})
    with pytest.raises(AuthError) as info:
        p.require("admin")
    assert info.value.status == 403


# -- the middleware, through a real aiohttp app -----------------------------------------


async def whoami(request: web.Request) -> web.Response:
    return web.json_response({"sub": principal(request).subject})


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path) -> TestClient:
    node = Node(Settings.model_validate({"storage": {"data_dir": str(tmp_path)}}))
    app = create_app(node, auth(), extra_routes=[
        # probes with the seed-001 and seed-002 error styles (the real routes test themselves)
        Route("POST", "/probe/seed001", whoami, scope="infer", style=ErrorStyle.SEED_001),
        Route("POST", "/probe/seed002", whoami, scope="infer", style=ErrorStyle.MESSAGE),
        Route("GET", "/admin", whoami, scope="admin"),
    ])
    return await aiohttp_client(app)  # type: ignore[no-any-return]


async def test_seed_001_error_shape(client: TestClient) -> None:
    r = await client.post("/probe/seed001")
    assert r.status == 401
    assert await r.json() == {"Result": "Failure", "Data": None, "Message": "Token missing"}
    r = await client.post("/probe/seed001",
                          headers={"Authorization": token({"exp": int(time.time()) - 5})})
    assert (await r.json())["Message"] == "Token expired"
    r = await client.post("/probe/seed001", headers={"Authorization": "nonsense"})
    assert (await r.json())["Message"] == "Invalid token"
    r = await client.post("/probe/seed001", headers={"Authorization": token()})
    assert r.status == 200 and (await r.json()) == {"sub": "ris"}


async def test_other_shapes_and_scopes(client: TestClient) -> None:
    r = await client.post("/probe/seed002")
    assert r.status == 401 and set(await r.json()) == {"message"}
    r = await client.get("/admin", headers={"Authorization": f"Bearer {token()}"})
    assert r.status == 403 and (await r.json())["error"] == "forbidden"
    r = await client.get("/admin", headers={"Authorization": token({"scope": "admin"})})
    assert r.status == 200
    r = await client.get("/health")  # open
    assert r.status in (200, 503)


# -- requests without credentials (auth.anonymous_scopes) -----------------------------------


def test_no_anonymous_principal_unless_the_settings_give_scopes() -> None:
    with pytest.raises(AuthError) as info:
        auth().authenticate(None, anonymous=True)
    assert info.value.failure is AuthFailure.MISSING
    a = auth(anonymous_scopes=["read"])
    with pytest.raises(AuthError):  # the route does not admit it
        a.authenticate(None)
    p = a.authenticate(None, anonymous=True)
    assert (p.kind, p.scopes, p.group) == ("anonymous", {"read"}, None)
    assert not p.may_use_project(1, "AI_CXR")  # no group, no project
    assert a.authenticate("  ", anonymous=True) is p


@pytest.mark.parametrize("header", ["garbage", "Bearer ", "Api-Key wrong",
                                    token(key=b"another-secret-of-sufficient-length-0123456789")])
def test_wrong_credentials_are_never_taken_as_anonymous(header: str) -> None:
    with pytest.raises(AuthError) as info:
        auth(anonymous_scopes=["infer", "read"]).authenticate(header, anonymous=True)
    assert info.value.status == 401


@pytest.fixture
async def open_client(aiohttp_client: Any, tmp_path: Path) -> TestClient:
    node = Node(Settings.model_validate({"storage": {"data_dir": str(tmp_path)}}))
    app = create_app(node, auth(anonymous_scopes=["read"]), extra_routes=[
        Route("GET", "/serving/read", whoami, scope="read", anonymous=True),
        Route("POST", "/serving/infer", whoami, scope="infer", anonymous=True),
        Route("GET", "/studies", whoami, scope="read"),
        Route("POST", "/probe/seed002", whoami, scope="read", style=ErrorStyle.MESSAGE,
              anonymous=True),
    ])
    return await aiohttp_client(app)  # type: ignore[no-any-return]


async def test_anonymous_scopes_open_only_the_routes_that_admit_them(
        open_client: TestClient) -> None:
    r = await open_client.get("/serving/read")
    assert r.status == 200 and await r.json() == {"sub": "anonymous"}
    # a scope not given to anonymous callers: they lack credentials, not a scope
    r = await open_client.post("/serving/infer")
    assert r.status == 401 and await r.json() == {"error": "unauthorized",
                                                  "message": "Token missing"}
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    r = await open_client.get("/studies")  # a route that does not admit them
    assert r.status == 401
    r = await open_client.post("/probe/seed002")
    assert r.status == 200
    # credentials sent are checked: wrong ones are refused, right ones are the caller
    for header in ("garbage", "Api-Key wrong", token({"exp": int(time.time()) - 5})):
        r = await open_client.get("/serving/read", headers={"Authorization": header})
        assert r.status == 401, header
    r = await open_client.post("/serving/infer", headers={"Authorization": token()})
    assert r.status == 200 and await r.json() == {"sub": "ris"}
    r = await open_client.get("/serving/read",
                              headers={"Authorization": f"Api-Key {API_KEY}"})
    assert r.status == 403  # the key has infer only: its own scopes, not anonymous ones


# -- projects (seed 002's "Model Run" permission) -------------------------------------------


def test_projects_of_api_keys_and_tokens(tmp_path: Path) -> None:
    settings = AuthSettings(api_keys=[
        ApiKeySettings(name="lab", key_sha256=hash_api_key(API_KEY), projects=["AI_CXR", 7]),
        ApiKeySettings(name="all", key_sha256=hash_api_key("k-all"))])
    a = Authenticator(settings, SECRET)
    lab = a.authenticate(f"Api-Key {API_KEY}")
    assert lab.may_use_project(3, "AI_CXR") and lab.may_use_project(7, "ARCHIVE")
    assert not lab.may_use_project(3, "ARCHIVE")
    assert not lab.may_use_project(3, "7")  # a name is a name, an id an id
    assert a.authenticate("Api-Key k-all").may_use_project(3, "ARCHIVE")
    assert a.authenticate(token()).projects is None  # no claim: every project
    one = a.authenticate(token({"projects": "AI_CXR"}))
    assert one.projects == {"AI_CXR"}
    assert a.authenticate(token({"projects": ["AI_CXR", 2]})).may_use_project(2, "X")
    assert not a.authenticate(token({"projects": []})).may_use_project(2, "X")
    for bad in ({"AI_CXR": 1}, [True], [["AI_CXR"]], 3):
        with pytest.raises(AuthError) as info:
            a.authenticate(token({"projects": bad}))
        assert info.value.failure is AuthFailure.INVALID
    # an identity provider's null ("no assignment") is never "every project"
    null = jwt.encode({"sub": "ris", "exp": int(time.time()) + 60, "projects": None}, SECRET,
                      algorithm="HS256")
    with pytest.raises(AuthError, match="projects claim is null"):
        a.authenticate(null)
    # YAML `projects:` left empty is null: a configuration error, not "every project"
    from dicom_node.config import ConfigError, load_settings

    config = tmp_path / "node.yaml"
    config.write_text("auth:\n  api_keys:\n    - name: ris\n"
                      f"      key_sha256: {hash_api_key('k')}\n      projects:\n")
    with pytest.raises(ConfigError, match=r"auth.api_keys.0.projects.*empty \(null\)"):
        load_settings(config, environ={})


async def test_two_authorization_headers_and_non_ascii_ones_are_refused(
        open_client: TestClient) -> None:
    """Only the first of two Authorization headers was read, so an empty one made a
    wrong token anonymous; a header with bytes outside ASCII was a 500 with a
    traceback in the log (the open /health too)."""
    from multidict import CIMultiDict

    two = CIMultiDict([("Authorization", ""), ("Authorization", "Bearer wrong.token.here")])
    r = await open_client.get("/serving/read", headers=two)
    assert r.status == 401 and (await r.json())["message"] == "more than one Authorization header"
    for header in ("Bearer \u00a0", "Api-Key caf\u00e9"):
        r = await open_client.get("/serving/read", headers={"Authorization": header})
        assert r.status == 401, header
        r = await open_client.get("/health", headers={"Authorization": header})
        assert r.status in (200, 503), header  # the open route answers as ever
