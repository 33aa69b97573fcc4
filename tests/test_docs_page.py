"""GET /docs: Swagger UI for the OpenAPI description, rendered by a real browser (Debian's chromium, headless),
from the service's own files only; its "Try it out" sends the page's own request and shows the service's answer."""
import json
import os
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


class DevTools:
    """Chromium driven over ``--remote-debugging-pipe``: DevTools protocol messages, each ended by a NUL byte,
    read by the browser from its fd 3 and written to its fd 4 (no WebSocket client needed)."""

    def __init__(self, browser: list[str]):
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()

        def onto_3_and_4():
            os.dup2(commands_read, 3)
            os.dup2(replies_write, 4)

        self.process = subprocess.Popen([*browser, "--remote-debugging-pipe"], pass_fds=(3, 4),
                                        preexec_fn=onto_3_and_4, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        os.close(commands_read)
        os.close(replies_write)
        self._unread, self._last_id = b"", 0

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self._last_id += 1
        message = {"id": self._last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:  # events and other replies pass by: the reply to this call has its id
            while b"\0" not in self._unread:
                chunk = os.read(self._replies, 1 << 16)
                assert chunk, "the browser closed its pipe"
                self._unread += chunk
            raw, self._unread = self._unread.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._last_id:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def close(self):
        os.close(self._commands)
        self.process.kill()
        self.process.wait(timeout=60)
        os.close(self._replies)


# Run in the page: press /predict's Execute (the page opens in "Try it out" mode: tryItOutEnabled) and wait, at
# most 600 polls of 100 ms each, for the answer Swagger UI shows; returns its status code and body as displayed.
TRY_IT_OUT = """(async () => {
  const found = async (find) => {
    for (let poll = 0; poll < 600; poll++) {
      const element = find();
      if (element) return element;
      await new Promise((done) => setTimeout(done, 100));
    }
    throw new Error("not on the page: " + find);
  };
  const operation = () => document.querySelector('.opblock-post [data-path="/predict"]').closest(".opblock");
  // Execute sends the body editor's text: wait until the editor holds the example
  await found(() => document.querySelector('.opblock-post [data-path="/predict"]') &&
                    operation().querySelector("textarea.body-param__text")?.value.includes("address1"));
  operation().querySelector("button.execute").click();
  const status = await found(() => operation().querySelector(".live-responses-table .response .response-col_status"));
  const body = operation().querySelector(".live-responses-table .response .response-col_description pre");
  return {status: status.textContent.trim(), body: body ? body.textContent : ""};
})()"""


def test_try_it_out_sends_the_pages_example_and_shows_the_services_answer(service_factory, tmp_path):
    service = service_factory(MGEO_WORKERS="1").wait_ready()
    answered = service.scrape().get(("mgeo_request_total", (("endpoint", "/predict"), ("method", "POST"),
                                                            ("status", "200"))), 0)
    browser = DevTools([*BROWSER, f"--user-data-dir={tmp_path / 'profile'}", "about:blank"])
    try:
        page = next(target for target in browser.call("Target.getTargets")["targetInfos"]
                    if target["type"] == "page")
        session = browser.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        browser.call("Page.navigate", session=session, url=service.url + "/docs/")  # answers once committed
        shown = browser.call("Runtime.evaluate", session=session, expression=TRY_IT_OUT, awaitPromise=True,
                             returnByValue=True, timeout=120_000)
    finally:
        browser.close()
    assert "exceptionDetails" not in shown, shown
    result = shown["result"]["value"]
    assert result["status"] == "200", result
    assert json.loads(result["body"])["label"] == "exact_match"  # the example pair: one place written two ways
    # the page's own request, through the browser: the service counted one more answered /predict
    assert service.scrape()[("mgeo_request_total", (("endpoint", "/predict"), ("method", "POST"),
                                                    ("status", "200")))] == answered + 1


def test_the_docs_page_is_served_from_the_package(service_factory):
    service = service_factory(MGEO_WORKERS="1").wait_ready()
    status, headers, page = http("GET", service.url + "/docs/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "/docs/swagger-ui-bundle.js" in page and "https://" not in page
    status, headers, _ = http("GET", service.url + "/docs/swagger-ui-bundle.js")
    assert status == 200 and "javascript" in headers["Content-Type"]
