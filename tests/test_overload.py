"""Overload and broken framing against a real service: open-loop arrivals far beyond capacity get
200, 429 or 504 and nothing else, no late 200, no backlog afterwards; framing errors get 400s."""
import json
import random
import socket
import sys
import threading

from conftest import ROOT, http

sys.path.insert(0, ROOT)
from bench.openloop import open_loop, parse_response  # noqa: E402

DEADLINE_MS = 1000
SLACK = 0.5  # the client's own scheduling


def lateness_bound(service) -> float:
    """When an answer is late: past its deadline by more than the longest forward the worker ran (one that
    started just before the deadline still ends: the smallest histogram bucket holding every forward) plus
    SLACK. On a slow or busy machine forwards are slower, and the bound with them; queueing past a
    deadline is what it catches."""
    samples = service.scrape()
    forwards = samples[("mgeo_inference_duration_seconds_count", ())]
    longest = min(float(dict(labels)["le"]) for (name, labels), value in samples.items()
                  if name == "mgeo_inference_duration_seconds_bucket" and value == forwards)
    return DEADLINE_MS / 1000 + longest + SLACK
PAIRS = [{"address1": f"北京市海淀区中关村大街{n}号", "address2": f"北京海淀中关村大街{n + k}号"}
         for n in range(1, 60) for k in (0, 1)]


def batch_bodies(size: int = 16) -> list[bytes]:
    rng = random.Random(7)
    return [json.dumps({"pairs": rng.sample(PAIRS, size)}, ensure_ascii=False).encode() for _ in range(50)]


def test_an_open_loop_burst_far_beyond_capacity_is_shed_not_queued(service_factory):
    service = service_factory(MGEO_WORKERS="1", MGEO_CACHE_SIZE="0", MGEO_BATCH_THREADS="2").wait_ready()
    url = service.url + "/predict"
    # 80 requests/s of 16 pairs: about 5x what two cores serve of the default model, for 5 s.
    answers = open_loop(url, batch_bodies(), rate=80, count=400, give_up=DEADLINE_MS / 1000 + 3,
                        headers={"X-Request-Timeout-Ms": str(DEADLINE_MS)})
    statuses = [a.status for a in answers]
    assert set(statuses) <= {200, 429, 504}, statuses
    assert statuses.count(200) and statuses.count(429), statuses  # served at capacity, and shed the rest
    bound = lateness_bound(service)
    late = [round(a.seconds, 3) for a in answers if a.status == 200 and a.seconds > bound]
    assert not late
    assert all(a.code == "overloaded" and int(a.retry_after) >= 1 for a in answers if a.status == 429)
    assert all(a.code == "deadline_exceeded" for a in answers if a.status == 504)
    samples = service.scrape()
    for reason, status in (("overloaded", 429), ("deadline_exceeded", 504)):
        assert samples[("mgeo_rejected_requests_total", (("reason", reason),))] == statuses.count(status)
    assert samples[("mgeo_worker_starts_total", ())] == 1  # no worker died or was restarted
    assert service.wait_until(lambda: service.metric("mgeo_queue_pairs") == 0, 30, "an empty queue")

    # The burst is over: the next request waits for no backlog; only forwards still running may end first.
    forwards = service.metric("mgeo_inference_batch_size_count")
    status, _, _ = http("POST", url, {"address1": "上海市徐汇区漕溪北路18号", "address2": "上海徐汇漕溪北路18号"})
    assert status == 200
    assert service.metric("mgeo_inference_batch_size_count") - forwards <= 2 + 1


def test_while_shedding_pairs_in_the_cache_are_answered_and_each_refusal_is_counted_once(service_factory):
    service = service_factory(MGEO_WORKERS="1", MGEO_BATCH_THREADS="2").wait_ready()  # the result cache on
    url = service.url + "/predict"
    cached = {"address1": "上海市徐汇区漕溪北路18号", "address2": "上海徐汇漕溪北路18号"}
    assert http("POST", url, cached)[0] == 200  # scored once: in the cache from now on
    # 200 requests/s for 3 s, over twice capacity: 4 pairs never sent before, and every fifth the cached pair.
    fresh = iter({"address1": f"浙江省杭州市西湖区文三路{n}号", "address2": f"杭州西湖文三路{n}号"} for n in range(1, 10**6))
    bodies = [json.dumps(cached if i % 5 == 4 else {"pairs": [next(fresh) for _ in range(4)]},
                         ensure_ascii=False).encode() for i in range(600)]
    answers = open_loop(url, bodies, rate=200, count=len(bodies), give_up=2.0 + 3)
    statuses = [a.status for a in answers]
    assert set(statuses) <= {200, 429, 504}, statuses
    assert statuses.count(429)  # it was shedding
    assert [a.status for a in answers[4::5]] == [200] * 120  # yet every request for the cached pair was answered
    samples = service.scrape()
    assert samples[("mgeo_rejected_requests_total", (("reason", "overloaded"),))] == statuses.count(429)
    for status in (200, 429, 504):  # refused in the main thread or by a thread: counted once either way
        key = ("mgeo_request_total", (("endpoint", "/predict"), ("method", "POST"), ("status", str(status))))
        assert samples.get(key, 0) == statuses.count(status) + (status == 200)
    assert samples[("mgeo_worker_starts_total", ())] == 1


def raw_exchange(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(raw)
        connection.shutdown(socket.SHUT_WR)  # then the client is done: early close
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
        return answer


def framing_cases(count: int = 60) -> list[bytes]:
    """Requests whose HTTP framing is broken: chunk sizes that are not hex, missing chunk terminators,
    bodies cut short of their chunk or Content-Length; fixed ones first, then seeded random ones."""
    body = json.dumps(PAIRS[0], ensure_ascii=False).encode()
    head = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    chunked = head + b"Transfer-Encoding: chunked\r\n\r\n"
    cases = [chunked + b"zz\r\n" + body + b"\r\n0\r\n\r\n",
             chunked + b"%x\r\n" % len(body) + body + b"XX0\r\n\r\n",
             chunked + b"40\r\n" + body[:10],
             head + b"Content-Length: %d\r\n\r\n" % (len(body) + 300) + body]
    rng = random.Random(20211)
    while len(cases) < count:
        kind = rng.choice(("size", "terminator", "cut", "length"))
        if kind == "size":
            size = rng.choice([b"-1", b"0x10", b"1g", b" ", b"ffffffffffffffffffff", b"%x;ext=\x00" % len(body)])
            cases.append(chunked + size + b"\r\n" + body + b"\r\n0\r\n\r\n")
        elif kind == "terminator":
            cases.append(chunked + b"%x\r\n" % len(body) + body + rng.choice([b"", b"\n", b"\r", b"0"]) * 2)
        elif kind == "cut":
            cases.append(chunked + b"%x\r\n" % len(body) + body[:rng.randrange(len(body))])
        else:
            cases.append(head + b"Content-Length: %d\r\n\r\n" % (len(body) + rng.randrange(1, 500))
                         + body[:rng.randrange(len(body))])
    return cases


def test_broken_framing_is_a_400_never_a_500(service_factory):
    service = service_factory(MGEO_WORKERS="1").wait_ready()
    workers = service.children()
    for raw in framing_cases():
        answer = raw_exchange(service.port, raw)
        if answer:  # Gunicorn may close a connection it cannot parse at all before the app sees it
            status, headers, body = parse_response(answer)
            assert 400 <= status < 500, (raw, answer[:300])
            if headers.get("content-type") == "application/json":
                assert json.loads(body)["error"]["code"]
    samples = service.scrape()
    assert not [key for key, value in samples.items()
                if key[0] == "mgeo_request_total" and dict(key[1])["endpoint"] == "/predict"
                and dict(key[1])["status"].startswith("5") and value]
    for status in ("400", "411"):  # Gunicorn's parser's, and the main thread's for a chunked body
        assert ("mgeo_request_total", (("endpoint", "/predict"), ("method", "POST"), ("status", status))) in samples
    assert service.children() == workers and service.metric("mgeo_worker_starts_total") == 1
    assert http("POST", service.url + "/predict", PAIRS[0])[0] == 200  # and it serves on


def single_pair_bodies(count: int) -> list[bytes]:
    return [json.dumps({"address1": f"浙江省杭州市西湖区文三路{n}号", "address2": f"杭州西湖文三路{n + n % 2}号"},
                       ensure_ascii=False).encode() for n in range(count)]


def long_pair_bodies(count: int) -> list[bytes]:
    """Pairs whose forward costs about 4x a short one's: a fixed rate of them overloads two cores however fast
    (a 2-core Xeon with AMX kept up with 300 short pairs a second)."""
    return [json.dumps({"address1": f"浙江省杭州市西湖区文三路{n}号华星时代广场A座{n % 30}楼{n}室西湖区文三路{n}号",
                        "address2": f"杭州市西湖区文三路{n}号华星时代广场A座写字楼{n % 30}层{n}室杭州西湖文三路{n}号"},
                       ensure_ascii=False).encode() for n in range(count)]


def test_kept_alive_clients_beyond_capacity_are_refused_by_the_main_thread_in_time(service_factory):
    """A pool of kept-alive connections, as an application or a proxy sends: each request is read whole by the
    main thread, and refused there while the worker is full, its deadline counted from its first byte."""
    service = service_factory(MGEO_WORKERS="1", MGEO_CACHE_SIZE="0", MGEO_BATCH_THREADS="2").wait_ready()
    # 300 long single pairs a second for 3 s: several times what two cores serve of the default model.
    answers = open_loop(service.url + "/predict", long_pair_bodies(900), rate=300, count=900,
                        give_up=DEADLINE_MS / 1000 + 3, headers={"X-Request-Timeout-Ms": str(DEADLINE_MS)},
                        keep_alive=True)
    statuses = [a.status for a in answers]
    assert set(statuses) <= {200, 429, 504}, statuses
    assert statuses.count(200) and statuses.count(429), statuses
    bound = lateness_bound(service)
    late = [round(a.seconds, 3) for a in answers if a.status in (200, 504) and a.seconds > bound]
    assert not late
    refusals = [line for line in service.access_lines() if line["status"] == 429]
    assert len(refusals) == statuses.count(429)
    assert sum(line.get("answered_by") == "main_thread" for line in refusals) >= statuses.count(429) // 2, refusals[:5]
    assert service.metric("mgeo_worker_starts_total") == 1


def test_a_closed_loop_right_after_clients_hung_up_is_not_refused(service_factory):
    service = service_factory(MGEO_WORKERS="1", MGEO_CACHE_SIZE="0").wait_ready()
    url = service.url + "/predict"
    # The warm-up: 400 long pairs a second for 2 s, from clients that give up after 0.1 s, most while their
    # requests wait (after 0.3 s, on a fast CPU, most of them had reached a forward already).
    warm_up = open_loop(url, long_pair_bodies(800), rate=400, count=800, give_up=0.1)
    assert sum(a.gave_up for a in warm_up) > 100
    # Forwards already started for clients that left end (they cannot be cut short); nothing else is waited for.
    assert service.wait_until(lambda: service.metric("mgeo_queue_pairs") == 0 and service.metric(
        "mgeo_requests_inprogress", endpoint="/predict", method="POST") == 0, 30, "an idle worker")
    statuses = []

    def client(n: int):
        for body in single_pair_bodies(10 * 32)[n::32]:
            statuses.append(http("POST", url, json.loads(body), timeout=30)[0])
    clients = [threading.Thread(target=client, args=(n,)) for n in range(32)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(120)
    assert statuses == [200] * 320, {s: statuses.count(s) for s in set(statuses)}
    gone = service.metric("mgeo_rejected_requests_total", reason="client_gone")
    assert gone > 0  # the warm-up's abandoned requests left the queue unanswered
