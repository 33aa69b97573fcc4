"""Open-loop load, as real clients behave: requests arrive at a fixed rate whatever the server does,
and each client gives up (closes its connection) after ``give_up`` seconds. Each request on its own
connection, or (``keep_alive``) on an idle one of a pool, as an application's HTTP pool or a proxy
with upstream keep-alive sends them: a new connection only when none is idle.

Used by `make bench` (the overload scenarios) and tests/test_overload.py. Loopback only: the
URL must be on 127.0.0.1, and the load is bounded by its request count.
"""
from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from dataclasses import dataclass

import uvloop


@dataclass
class Answer:
    sent_at: float           # seconds from the start of the load
    status: int | None       # None: no answer before the client gave up (or the connection failed)
    seconds: float           # until the answer, or until giving up
    code: str | None = None  # the error code of a JSON error answer
    retry_after: str | None = None
    gave_up: bool = False


def request_bytes(host: str, port: int, path: str, body: bytes, headers: dict, keep_alive: bool = False) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", *([] if keep_alive else ["Connection: close"]),
             *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def parse_response(raw: bytes) -> tuple[int, dict, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


async def _read_answer(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    _, headers, _ = parse_response(head)
    return head + await reader.readexactly(int(headers.get("content-length", 0)))


async def _one(host: str, port: int, payload: bytes, give_up: float, started: float, sent_at: float,
               pool: list | None) -> Answer:
    writer = None

    def idle_connection():
        # As an HTTP pool does (urllib3's is_connection_dropped): a connection the server has closed
        # meanwhile (its keep-alive timeout) is dropped, not sent on.
        while pool:
            reader, writer = pool.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        return None

    async def exchange():
        nonlocal writer
        reader, writer = (pool is not None and idle_connection()) or await asyncio.open_connection(host, port)
        writer.write(payload)
        await writer.drain()
        if pool is None:
            return await reader.read()  # Connection: close: the answer ends with the connection
        raw = await _read_answer(reader)
        if parse_response(raw)[1].get("connection", "").lower() != "close":
            pool.append((reader, writer))  # idle again, for the next request
            writer = None
        return raw

    try:
        raw = await asyncio.wait_for(exchange(), give_up)
        status, headers, body = parse_response(raw)
        code = None
        if status >= 400:
            try:
                code = json.loads(body)["error"]["code"]
            except (ValueError, KeyError, TypeError):
                pass
        return Answer(sent_at, status, time.perf_counter() - started - sent_at, code, headers.get("retry-after"))
    except asyncio.TimeoutError:
        return Answer(sent_at, None, give_up, gave_up=True)
    except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
        return Answer(sent_at, None, time.perf_counter() - started - sent_at)
    finally:
        if writer is not None:
            writer.close()  # giving up closes the connection, as a client's timeout does


async def _run(url: str, bodies: list[bytes], rate: float, count: int, give_up: float, headers: dict,
               keep_alive: bool) -> list[Answer]:
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname == "127.0.0.1", "open-loop load targets 127.0.0.1 only"
    payloads = [request_bytes(parts.hostname, parts.port, parts.path, body, headers, keep_alive) for body in bodies]
    pool = [] if keep_alive else None
    started = time.perf_counter()
    tasks = []
    for i in range(count):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(
            _one(parts.hostname, parts.port, payloads[i % len(payloads)], give_up, started, i / rate, pool)))
    answers = list(await asyncio.gather(*tasks))
    for _, writer in pool or []:
        writer.close()
    return answers


def open_loop(url: str, bodies: list[bytes], rate: float, count: int, give_up: float,
              headers: dict | None = None, keep_alive: bool = False) -> list[Answer]:
    """``count`` requests to ``url`` at ``rate`` per second, cycling through ``bodies``."""
    # uvloop: the load shares the cores with the service, and it costs half of asyncio's own loop per request.
    return uvloop.run(_run(url, bodies, rate, count, give_up, headers or {}, keep_alive))


def summary(answers: list[Answer], deadline: float, pairs_per_request: int = 1) -> dict:
    """Counts by outcome, and the pairs answered 200 within ``deadline`` per second of the load."""
    seconds = max(a.sent_at for a in answers) + 1e-9
    in_time = [a for a in answers if a.status == 200 and a.seconds <= deadline]
    refused = sorted(a.seconds for a in answers if a.status == 429)
    by_status: dict[str, int] = {}
    for a in answers:
        key = str(a.status) if a.status else ("gave_up" if a.gave_up else "failed")
        by_status[key] = by_status.get(key, 0) + 1
    return {"requests": len(answers), "offered_per_second": round(len(answers) / seconds, 1),
            "by_status": by_status, "answered_in_time": len(in_time),
            "pairs_in_time_per_second": round(len(in_time) * pairs_per_request / seconds, 1),
            "late_200": sum(a.status == 200 and a.seconds > deadline for a in answers),
            "p99_429_ms": round(refused[int(len(refused) * 0.99) - 1] * 1000, 2) if refused else None}
