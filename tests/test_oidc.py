"""
Single sign-on with an OpenID Connect provider: a provider started by the
test on a loopback port (tests/idp.py) publishes its keys and signs tokens;
the gateway verifies them locally. Only a good token is let in; the keys
are fetched again when the provider rotates them, at most once a minute;
the dashboard signs in through the provider's authorization-code flow with
PKCE.
"""

from __future__ import annotations

import json
import time
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from gateway.api.oidc import Oidc, OidcError, oidc_from_table
from gateway.api.sessions import COOKIE
from gateway.config import ConfigError, build_config
from tests.idp import CLIENT_ID, Provider
from tests.test_api import close_gateway, ctl, open_gateway


def settings(provider: Provider, **changes):
    return oidc_from_table(provider.settings(**changes), {})


def verifier_for(provider: Provider) -> tuple[task.Clock, object]:
    """A verifier whose waits between key fetches run on a clock of the test's."""
    clock = task.Clock()
    clock.advance(1000)
    return clock, Oidc(settings(provider), reactor, clock).verifier


async def refused(verifier, token: str) -> OidcError:
    with pytest.raises(OidcError) as e:
        await verifier.identity(token)
    return e.value


@pytest_twisted.ensureDeferred
async def test_only_a_good_token_is_let_in():
    provider = Provider()
    try:
        _, v = verifier_for(provider)

        who = await v.identity(provider.token())
        assert (who.subject, who.role) == ("maria", "admin") and who.expires > time.time()
        assert provider.jwks_fetches == 1

        cases = {
            "expired": provider.token(exp=int(time.time()) - 120),
            "another audience": provider.token(aud="someone-else"),
            "another issuer": provider.token(iss="https://evil.example"),
            "an unknown key": _with_unpublished_key(provider),
            "alg none": provider.unsigned("none"),
            "HS256 keyed with the public key": provider.unsigned("HS256", provider.public_pem("k1")),
            "not a JWT": "eyJhbGciOi.not-base64.at-all",
        }
        for what, token in cases.items():
            e = await refused(v, token)
            assert e.code == "unauthorized", what
        assert (await refused(v, provider.token(groups=["visitors"]))).code == "forbidden"
        assert (await v.identity(provider.token(groups=["gateway-readers"]))).role == "reader"
        assert (await v.identity(provider.token(groups=["gateway-operators"]))).role == "operator"
        both = provider.token(groups=["gateway-readers", "gateway-operators"])
        assert (await v.identity(both)).role == "operator"  # the most a token's groups give
        # An unknown key fetched the keys again at most once a minute: not within the first minute.
        assert provider.jwks_fetches == 1
    finally:
        await provider.close()


@pytest_twisted.ensureDeferred
async def test_a_token_whose_alg_is_not_its_keys_or_that_is_malformed_is_refused_not_an_error():
    """EC and RSA keys side by side: a token naming the other family's algorithm is 401, never a traceback."""
    from cryptography.hazmat.primitives.asymmetric import ec

    provider = Provider()
    provider.add_key("e1", curve=ec.SECP256R1())
    try:
        _, v = verifier_for(provider)
        assert (await v.identity(provider.token(kid="e1"))).role == "admin"  # an EC key signs in
        cases = {
            "RS256 naming the EC key": (provider.token(kid="e1", alg="RS256"), "not that of its key 'e1'"),
            "ES256 naming the RSA key": (provider.token(kid="k1", alg="ES256"), "not that of its key 'k1'"),
            "PS256 naming the RSA key bound to RS256": (provider.token(kid="k1", alg="PS256"), "not that of its key"),
            "an unknown crit header": (
                provider.token(headers={"crit": ["exp-ext"], "exp-ext": 1}),
                "critical extension",
            ),
            "a kid that is not a string": (provider.token(headers={"kid": ["k1"]}), "must be a string"),
        }
        for what, (token, reason) in cases.items():
            e = await refused(v, token)
            assert e.code == "unauthorized" and reason.lower() in e.message.lower(), (what, e.message)
        for shape in ({"gateway-admins": True}, [["gateway-admins"]], [{"name": "gateway-admins"}], 7, None):
            e = await refused(v, provider.token(groups=shape))
            assert e.code == "forbidden" and "no role" in e.message, (shape, e.message)
    finally:
        await provider.close()


@pytest_twisted.ensureDeferred
async def test_the_api_answers_401_and_logs_no_traceback_for_a_mismatched_alg(tmp_path, db_dsn):
    from cryptography.hazmat.primitives.asymmetric import ec

    provider = Provider()
    provider.add_key("e1", curve=ec.SECP256R1())
    service, gw = await open_gateway(tmp_path, db_dsn, {"oidc": provider.settings()})
    try:
        for token in (provider.token(kid="e1", alg="RS256"), provider.token(kid="k1", alg="ES256")):
            code, body = await gw.get("/v1/devices", token)
            assert (code, body["error"]) == (401, "unauthorized") and "not that of its key" in body["message"]
        code, body = await gw.get("/v1/devices", provider.token(groups=[["gateway-admins"]]))
        assert code == 403 and "no role" in body["message"]
    finally:
        await close_gateway(service, gw)
        await provider.close()


def _with_unpublished_key(provider: Provider) -> str:
    provider.add_key("stray", publish=False)
    return provider.token(kid="stray")


@pytest_twisted.ensureDeferred
async def test_rotated_keys_are_fetched_again_at_most_once_a_minute():
    provider = Provider()
    try:
        clock, v = verifier_for(provider)
        assert (await v.identity(provider.token())).role == "admin"
        provider.add_key("k2")  # the provider rotates: k2 signs from now on
        rotated = provider.token(kid="k2")
        clock.advance(30)
        assert (await refused(v, rotated)).code == "unauthorized"  # fetched 30 s ago: not again yet
        assert provider.jwks_fetches == 1
        clock.advance(31)
        assert (await v.identity(rotated)).subject == "maria"
        assert provider.jwks_fetches == 2
        stray = _with_unpublished_key(provider)
        for _ in range(5):  # a flood of tokens with unknown keys fetches nothing more within the minute
            assert (await refused(v, stray)).code == "unauthorized"
        assert provider.jwks_fetches == 2
    finally:
        await provider.close()


def test_oidc_settings_are_checked_at_start():
    provider_url = "https://idp.example"
    good = {
        "issuer": provider_url,
        "jwks_url": provider_url + "/jwks",
        "audience": "txgateway",
        "roles": {"reader": ["staff"]},
    }
    assert build_config({}, {"oidc": good}).oidc.reader == ("staff",)
    for change, message in (
        ({"jwks_url": "http://idp.example/jwks"}, "jwks_url: 'http://idp.example/jwks' is not an https:// URL"),
        ({"audience": None}, "audience: give the audience"),
        ({"roles": {"owner": ["x"]}}, "roles: give [oidc.roles]"),
        ({"authorization_endpoint": provider_url + "/auth"}, "go together"),
        ({"colour": "blue"}, "unknown key 'colour'"),
        ({"client_secret": {"env": "NO_SUCH_VARIABLE_HERE"}}, "NO_SUCH_VARIABLE_HERE is not set"),
    ):
        table = {k: v for k, v in {**good, **change}.items() if v is not None}
        with pytest.raises(ConfigError) as e:
            build_config({}, {"oidc": table})
        assert message in str(e.value), (change, str(e.value))


@pytest_twisted.ensureDeferred
async def test_the_read_api_and_the_dashboard_take_the_providers_tokens(tmp_path, db_dsn):
    provider = Provider()
    service, gw = await open_gateway(tmp_path, db_dsn, {"oidc": provider.settings()})
    try:
        reader = provider.token(groups=["gateway-readers"])
        assert (await gw.get("/v1/devices", reader))[0] == 200
        assert (await gw.get("/v1/quarantine", reader))[0] == 403
        assert (await gw.get("/v1/quarantine", provider.token()))[0] == 200
        code, body = await gw.get("/v1/devices", provider.token(groups=[]))
        assert (code, body["error"]) == (403, "forbidden") and "no role" in body["message"]
        assert (await gw.get("/v1/devices", provider.token(aud="other")))[0] == 401
        assert (await gw.get("/v1/devices", provider.unsigned("none")))[0] == 401
        health = (await gw.get("/healthz", None))[1]["oidc"]
        assert health["keys"] == 1 and health["last_error"] is None and health["fetches"] >= 1

        # Pasted into the dashboard's sign-in, a provider's token gives a session that ends when the token does.
        exp = int(time.time()) + 300
        response = await gw.http.post(
            gw.url + "/ui/session",
            data=json.dumps({"token": provider.token(exp=exp)}).encode(),
            headers={"Content-Type": "application/json"},
        )
        doc = json.loads(await response.content())
        assert response.code == 200 and doc["subject"] == "maria" and doc["role"] == "admin"
        jar: SimpleCookie = SimpleCookie()
        jar.load(response.headers.getRawHeaders("set-cookie")[0])
        assert 250 <= int(jar[COOKIE.decode()]["max-age"]) <= 300
        sessions = json.loads(await ctl(db_dsn, "session", "list", "--json"))
        assert [(s["subject"], s["role"]) for s in sessions] == [("maria", "admin")]
    finally:
        await close_gateway(service, gw)
        await provider.close()


@pytest_twisted.ensureDeferred
async def test_the_dashboard_signs_in_through_the_provider_with_pkce(tmp_path, db_dsn):
    provider = Provider()
    provider.user["groups"] = ["gateway-readers"]
    service, gw = await open_gateway(tmp_path, db_dsn, {"oidc": provider.settings()})
    try:
        assert (await gw.get("/ui/sign-in", None))[1]["provider"] == {"name": "Plant SSO", "url": "/ui/oidc/login"}

        async def get(url: str, cookie: str | None = None):
            headers = {"Cookie": cookie} if cookie else {}
            response = await gw.http.get(url, headers=headers, allow_redirects=False)
            await response.content()
            jar: SimpleCookie = SimpleCookie()
            for header in response.headers.getRawHeaders("set-cookie", []):
                jar.load(header)
            return response.code, (response.headers.getRawHeaders("location") or [""])[0], jar

        async def sign_in(tamper=None):
            code, to_provider, jar = await get(gw.url + "/ui/oidc/login")
            assert code == 302 and to_provider.startswith(provider.url + "/authorize?")
            query = parse_qs(urlsplit(to_provider).query)
            assert query["code_challenge_method"] == ["S256"] and query["client_id"] == [CLIENT_ID]
            assert query["redirect_uri"] == [gw.url + "/ui/oidc/callback"]
            flow = jar["__Host-gateway-oidc"]
            assert flow["httponly"] and flow["secure"] and flow["samesite"].lower() == "lax"
            code, back, _ = await get(to_provider)
            assert code == 302 and back.startswith(gw.url + "/ui/oidc/callback?")
            cookie = f"__Host-gateway-oidc={flow.value}"
            if tamper:
                back, cookie = tamper(back, cookie)
            return await get(back, cookie)

        code, page, jar = await sign_in()
        assert (code, page) == (302, "/ui/")
        session = jar[COOKIE.decode()].value
        assert provider.token_requests[-1]["code_verifier"]  # PKCE: the verifier went to the token endpoint
        response = await gw.http.get(gw.url + "/v1/devices", headers={"Cookie": f"{COOKIE.decode()}={session}"})
        assert response.code == 200
        await response.content()
        listed = json.loads(await ctl(db_dsn, "session", "list", "--json"))
        assert [(s["subject"], s["role"]) for s in listed] == [("maria", "reader")]

        # Another browser's state, or a flow cookie whose PKCE verifier is not the one challenged: refused.
        def other_state(back, cookie):
            return back.replace("state=", "state=x"), cookie

        code, page, jar = await sign_in(other_state)
        assert code == 302 and page.startswith("/ui/?error=") and COOKIE.decode() not in jar

        def other_verifier(back, cookie):
            from gateway.api.oidc import Flow

            flow = Flow.from_cookie(cookie.split("=", 1)[1].encode())
            forged = Flow(flow.state, "x" * 64, flow.nonce, flow.redirect_uri)
            return back, "__Host-gateway-oidc=" + forged.cookie().decode()

        code, page, jar = await sign_in(other_verifier)
        assert code == 302 and "did+not+give+tokens" in page and COOKIE.decode() not in jar
        # A user without a role on this gateway gets no session.
        provider.user["groups"] = ["visitors"]
        code, page, jar = await sign_in()
        assert code == 302 and "no+role" in page and COOKIE.decode() not in jar
    finally:
        await close_gateway(service, gw)
        await provider.close()
