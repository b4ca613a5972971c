"""A FastAPI app that shares state through kvclient.aio (the README's example), and its server.

Run as ``python -m tests.aio_app``: it binds 127.0.0.1 port 0, prints the port, and serves the
app with uvicorn until SIGTERM. The kvserve address and key come from ``KV_ADDRESS`` and
``KV_AUTHKEY``, as for any client. Test support only (``tests/test_aio_app.py``).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI

import kvclient.aio


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # One client per worker process, shared by every request it serves (a pool inside).
    async with kvclient.aio.connect() as kv:
        app.state.kv = kv
        app.state.hits = await kv.dict("hits")
        yield


app = FastAPI(lifespan=lifespan)


@app.post("/hit/{page}")
async def hit(page: str) -> dict[str, Any]:
    """Count a visit: one atomic ``incr`` on the server, whichever worker serves it."""
    return {"page": page, "count": await app.state.hits.incr(page)}


@app.post("/rmw/{page}")
async def read_modify_write(page: str) -> dict[str, Any]:
    """Count a visit by reading and writing back, under a lock shared by every worker."""
    async with app.state.kv.lock(f"rmw:{page}"):
        count = await app.state.hits.get(f"rmw:{page}", 0) + 1
        await app.state.hits.set(f"rmw:{page}", count)
    return {"page": page, "count": count}


@app.get("/hits/{page}")
async def hits(page: str) -> dict[str, Any]:
    """Return a page's counts."""
    d = app.state.hits
    return {"page": page, "count": await d.get(page, 0), "rmw": await d.get(f"rmw:{page}", 0)}


def main() -> None:
    """Serve the app on 127.0.0.1, a port the system picks (printed first), until SIGTERM."""
    sock = socket.create_server(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    main()
