"""Which HTTP server adds less per-token latency to a stream: uvicorn + starlette, or aiohttp?

    python -m flashllm.runtime.tools.http_server_choice --events 2000 --repeats 5

Each server runs in its own process on uvloop (as in the daemon) behind a unix
socket and streams `--events` server-sent events the size of one token's chunk,
each handed over through an asyncio.Queue the way the scheduler hands a token
to the HTTP handler. The ZeroMQ ROUTER → DEALER path sends the same number of
msgpack frames. The client (one process, httpx for HTTP, pyzmq for ZeroMQ)
times the whole stream; per event = wall / events. Median of --repeats.
Decided once, recorded in docs/benchmarks.md; the daemon does not import this.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import tempfile
import time

CHUNK = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m",
         "choices": [{"index": 0, "text": " word", "finish_reason": None}]}


async def _tokens(count: int):
    queue: asyncio.Queue = asyncio.Queue()

    async def producer() -> None:
        for _ in range(count):
            queue.put_nowait(" word")
            await asyncio.sleep(0)  # a scheduler step yields to the loop between tokens
        queue.put_nowait(None)

    task = asyncio.create_task(producer())
    while (item := await queue.get()) is not None:
        yield item
    await task


def _serve_starlette(path: str, count: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def stream(request):
        async def events():
            async for _ in _tokens(count):
                yield f"data: {json.dumps(CHUNK)}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/s", stream)])
    uvicorn.run(app, uds=path, loop="uvloop", http="httptools", log_level="warning", lifespan="off")


def _serve_aiohttp(path: str, count: int) -> None:
    import uvloop
    from aiohttp import web

    async def stream(request):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        async for _ in _tokens(count):
            await response.write(f"data: {json.dumps(CHUNK)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/s", stream)
    uvloop.install()
    web.run_app(app, path=path, print=None)


def _serve_zmq(path: str, count: int) -> None:
    import msgpack
    import uvloop
    import zmq
    import zmq.asyncio

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.bind("ipc://" + path)
        while True:
            identity, _ = await sock.recv_multipart()
            async for _ in _tokens(count):
                sock.send_multipart([identity, msgpack.packb({"type": "chunk", "id": "r", "text": " word",
                                                              "token_ids": [1]})], flags=zmq.NOBLOCK)
            sock.send_multipart([identity, msgpack.packb({"type": "final"})], flags=zmq.NOBLOCK)

    uvloop.run(main())


async def _client_http(path: str) -> int:
    import httpx

    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=path)) as client:
        async with client.stream("GET", "http://local/s") as response:
            return len([line async for line in response.aiter_lines() if line.startswith("data: ")])


async def _client_zmq(path: str) -> int:
    import msgpack
    import zmq
    import zmq.asyncio

    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect("ipc://" + path)
    await sock.send(b"go")
    received = 0
    while msgpack.unpackb(await sock.recv())["type"] != "final":
        received += 1
    sock.close(linger=0)
    ctx.term()
    return received


def measure(name: str, serve, client, count: int, repeats: int) -> dict:
    directory = tempfile.mkdtemp(prefix="flhttp-")
    path = os.path.join(directory, "s.sock")
    process = multiprocessing.get_context("spawn").Process(target=serve, args=(path, count), daemon=True)
    process.start()
    try:
        while not os.path.exists(path):
            time.sleep(0.05)
        time.sleep(0.3)
        asyncio.run(client(path))  # warm-up
        walls = []
        for _ in range(repeats):
            start_s = time.perf_counter()
            asyncio.run(client(path))
            walls.append(time.perf_counter() - start_s)
        wall_s = statistics.median(walls)
        return {"server": name, "events": count, "median_wall_s": wall_s, "us_per_event": wall_s / count * 1e6}
    finally:
        process.terminate()
        process.join()
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    rows = [measure("zeromq (baseline)", _serve_zmq, _client_zmq, args.events, args.repeats),
            measure("uvicorn+starlette", _serve_starlette, _client_http, args.events, args.repeats),
            measure("aiohttp", _serve_aiohttp, _client_http, args.events, args.repeats)]
    print(f"{'server':>20} {'events':>7} {'wall s':>7} {'us/event':>9}")
    for row in rows:
        print(f"{row['server']:>20} {row['events']:>7} {row['median_wall_s']:>7.3f} {row['us_per_event']:>9.1f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
