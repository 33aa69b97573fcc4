"""The OpenAPI description against the live service: schemathesis finds no 5xx and no off-schema answer."""
import json
import os
import subprocess
import sys

from conftest import ROOT, http
from mgeo_service.api import OPENAPI_WITHOUT_TOKEN


def test_served_description_is_the_committed_file(service_factory):
    service = service_factory().wait_ready()
    status, _, served = http("GET", service.url + "/openapi.json")
    with open(os.path.join(ROOT, "mgeo_service", "openapi.json"), encoding="utf-8") as f:
        committed = json.load(f)
    # Without MGEO_API_TOKEN the committed file is served without its security (tests/test_app.py: with one, whole).
    assert status == 200 and served == OPENAPI_WITHOUT_TOKEN
    assert "security" in committed["paths"]["/predict"]["post"] and "security" not in json.dumps(served)
    assert served["paths"].keys() == committed["paths"].keys()
    assert served["components"]["schemas"] == committed["components"]["schemas"]


def test_schemathesis_finds_nothing(service_factory, tmp_path):
    service = service_factory().wait_ready()
    # Its not_a_server_error check counts every 5xx, and a request it sends with X-Request-Timeout-Ms: 1
    # rightly gets 504 deadline_exceeded; the access log below is held to no other 5xx instead.
    result = subprocess.run(
        ["schemathesis", "run", service.url + "/openapi.json", "--checks", "all", "--exclude-checks",
         "not_a_server_error", "--max-examples", "40", "--workers", "2", "--seed", "20211"],
        # In tmp_path: schemathesis writes its crash cache (.schemathesis/) where it runs, not into the checkout.
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
             # the address format's strategy (schemathesis_hooks.py)
             "SCHEMATHESIS_HOOKS": "schemathesis_hooks", "PYTHONPATH": os.path.join(ROOT, "tests")})
    assert result.returncode == 0, result.stdout[-4000:]
    assert "No issues found" in result.stdout
    answers = [json.loads(line) for line in service.log().splitlines() if line.startswith('{"ts"')]
    statuses = [answer["status"] for answer in answers if answer["route"] == "/predict"]
    assert statuses and not [status for status in statuses if status >= 500 and status != 504]
