"""GET /docs: Swagger UI for the OpenAPI description, rendered by a real browser (Debian's chromium, headless),
from the service's own files only."""
import json
import re
import subprocess

from conftest import http

BROWSER = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_the_docs_page_renders_both_routes_in_a_browser_without_leaving_the_host(service_factory, tmp_path):
    service = service_factory(MGEO_WORKERS="1").wait_ready()
    net_log = tmp_path / "net-log.json"
    browser = subprocess.run([*BROWSER, f"--user-data-dir={tmp_path / 'profile'}", f"--log-net-log={net_log}",
                              "--virtual-time-budget=20000", "--dump-dom", service.url + "/docs/"],
                             capture_output=True, text=True, timeout=180)
    dom = browser.stdout
    assert browser.returncode == 0, browser.stderr[-2000:]
    # Swagger UI rendered the description: an operation block per route, from /openapi.json
    assert {"/predict", "/rank"} <= set(re.findall(r'data-path="(/[a-z.]+)"', dom))
    assert "mgeo-service" in dom
    # Each operation open with its real example (a Chinese address pair), not one made up from the schema;
    # labels as choices; no token asked for where none is configured.
    assert "北京市海淀区中关村大街1号" in dom and "北京海淀中关村大街1号" in dom
    assert "exact_match" in dom and "btn authorize" not in dom  # Swagger UI's Authorize button
    # Every request the page made (its initiator is the page's origin; the browser's own update and
    # account checks are not the page's) went to the service.
    events = json.loads(net_log.read_text(encoding="utf-8"))["events"]
    asked = {event["params"]["url"] for event in events
             if event.get("params", {}).get("initiator") == service.url and "url" in event["params"]}
    assert {service.url + "/openapi.json", service.url + "/docs/swagger-ui-bundle.js"} <= asked
    assert {url.split("/")[2] for url in asked} == {service.url.split("/")[2]}


def test_the_docs_page_is_served_from_the_package(service_factory):
    service = service_factory(MGEO_WORKERS="1").wait_ready()
    status, headers, page = http("GET", service.url + "/docs/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "/docs/swagger-ui-bundle.js" in page and "https://" not in page
    status, headers, _ = http("GET", service.url + "/docs/swagger-ui-bundle.js")
    assert status == 200 and "javascript" in headers["Content-Type"]
