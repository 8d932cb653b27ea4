"""A small HTTP/1.1 keep-alive load generator on raw asyncio sockets (run as its own process).

Each of C connections sends POST requests back to back; latencies are measured per request
(a server that closes the connection after each answer is reconnected to, inside the timing).
Bounded by a request count and a time limit, and only ever talks to 127.0.0.1.
Prints JSON: {"latencies_ms": [...], "wall_s": ..., "errors": n}; with --took also "took_ms": the
server's own `took_ms` of each answer (read after the request is timed), to split a latency into
the time inside the route and the time outside it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time


REQUEST_TIMEOUT_S = 30  # a request the server never answers is an error, not a hung benchmark


async def exchange(reader, writer, request: bytes) -> tuple[bytes, bool, bytes]:
    """Send one request, read its answer: (status line, whether the server closes, body)."""
    writer.write(request)
    await writer.drain()
    status = await reader.readline()
    length, close = 0, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name = line.lower()
        if name.startswith(b"content-length:"):
            length = int(line.split(b":")[1])
        elif name.startswith(b"connection:") and b"close" in name:
            close = True
    return status, close, await reader.readexactly(length)


async def connection(port: int, path: str, bodies: list[bytes], todo: list[int], lat: list[float], errors: list,
                     deadline: float, took: list[float] | None):
    """One client: requests back to back on a keep-alive connection, reconnecting (inside the
    timed request) whenever the server answers `Connection: close`, as Werkzeug's does."""
    reader = writer = None
    try:
        while todo and time.perf_counter() < deadline:
            i = todo.pop()
            body = bodies[i % len(bodies)]
            head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode()
            t0 = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), REQUEST_TIMEOUT_S)
                status, close, answer = await asyncio.wait_for(exchange(reader, writer, head + body), REQUEST_TIMEOUT_S)
            except (asyncio.TimeoutError, OSError, asyncio.IncompleteReadError) as e:
                errors.append(f"{e.__class__.__name__} after {time.perf_counter() - t0:.1f}s")
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            if close:
                writer.close()
                reader = writer = None
            lat.append((time.perf_counter() - t0) * 1000)
            if b" 200 " not in status:
                errors.append(status.decode().strip())
            if took is not None:
                took.append(json.loads(answer).get("took_ms", float("nan")) if b" 200 " in status else float("nan"))
    finally:
        if writer is not None:
            writer.close()


async def run(port, path, bodies, concurrency, requests, max_seconds, with_took: bool = False):
    todo = list(range(requests))
    lat: list[float] = []
    errors: list = []
    took: list[float] | None = [] if with_took else None
    deadline = time.perf_counter() + max_seconds
    t0 = time.perf_counter()
    await asyncio.gather(*(connection(port, path, bodies, todo, lat, errors, deadline, took) for _ in range(concurrency)))
    out = {"latencies_ms": lat, "wall_s": time.perf_counter() - t0, "errors": len(errors), "first_error": errors[:1]}
    if took is not None:
        out["took_ms"] = took
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/v1/search")
    ap.add_argument("--bodies", required=True, help="JSONL file, one request body per line")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-seconds", type=float, default=60)
    ap.add_argument("--took", action="store_true", help="also report the took_ms of each answer")
    a = ap.parse_args()
    bodies = [line.encode() for line in open(a.bodies).read().splitlines() if line.strip()]
    print(json.dumps(asyncio.run(run(a.port, a.path, bodies, a.concurrency, a.requests, a.max_seconds, a.took))))


if __name__ == "__main__":
    main()
