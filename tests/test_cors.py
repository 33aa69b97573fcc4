"""CORS is opt-in: no header at all by default; with MGEO_CORS_ORIGINS, preflights and answers of the scoring
routes for exactly those origins."""
import pytest

from test_app import PAIR, make_app

ORIGINS = "http://maps.example, https://ops.example:8443"
PREFLIGHT = {"Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "content-type, authorization, x-request-timeout-ms"}


@pytest.fixture(scope="module")
def client():
    return make_app(MGEO_CORS_ORIGINS=ORIGINS, MGEO_API_TOKEN="t0ken").test_client()


def cors_headers(response) -> dict:
    return {k.lower(): v for k, v in response.headers.items() if k.lower().startswith("access-control-")}


def test_no_cors_header_unless_origins_are_set():
    client = make_app().test_client()
    headers = {"Origin": "http://maps.example"}
    assert cors_headers(client.post("/predict", json=PAIR, headers=headers)) == {}
    assert cors_headers(client.options("/predict", headers={**headers, **PREFLIGHT})) == {}


@pytest.mark.parametrize("route", ["/predict", "/rank"])
@pytest.mark.parametrize("origin", ["http://maps.example", "https://ops.example:8443"])
def test_a_listed_origin_gets_its_preflight_answered_without_a_token(client, route, origin):
    response = client.options(route, headers={"Origin": origin, **PREFLIGHT})
    assert response.status_code == 200
    headers = cors_headers(response)
    assert headers["access-control-allow-origin"] == origin
    assert "POST" in headers["access-control-allow-methods"]
    assert {"content-type", "authorization", "x-request-timeout-ms"} <= \
        {h.strip().lower() for h in headers["access-control-allow-headers"].split(",")}
    assert headers["access-control-max-age"] == "600"


def test_a_listed_origin_reads_the_answer_and_its_retry_headers(client):
    response = client.post("/predict", json=PAIR, headers={"Origin": "http://maps.example",
                                                           "Authorization": "Bearer t0ken"})
    assert response.status_code == 200
    headers = cors_headers(response)
    assert headers["access-control-allow-origin"] == "http://maps.example"
    assert {"retry-after", "x-request-id"} <= {h.strip().lower() for h in
                                                headers["access-control-expose-headers"].split(",")}
    assert "Origin" in response.headers.get("Vary", "")


@pytest.mark.parametrize("origin", ["http://evil.example", "http://maps.example:8080", "https://maps.example"])
def test_any_other_origin_gets_no_cors_header(client, origin):
    assert cors_headers(client.options("/rank", headers={"Origin": origin, **PREFLIGHT})) == {}
    assert cors_headers(client.post("/predict", json=PAIR, headers={"Origin": origin,
                                                                   "Authorization": "Bearer t0ken"})) == {}


def test_only_the_scoring_routes_answer_cross_origin(client):
    assert cors_headers(client.get("/health/ready", headers={"Origin": "http://maps.example"})) == {}
