"""kvclient.aio in a real web app: two FastAPI (uvicorn) processes sharing one kvserve.

Concurrent HTTP requests, spread over both app processes, each counted on the server; the
totals are exact: ``incr`` is atomic, and the read-modify-write is under an asyncio
``kv.lock`` that excludes the other process's tasks and the same process's other tasks.
"""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kvclient

N_REQUESTS = 300


def _request(port: int, method: str, path: str) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, (response.status, body)
        return json.loads(body)
    finally:
        conn.close()


def test_two_fastapi_workers_share_exact_counts(
    address: str, authkey: bytes, clean_env: dict[str, str]
) -> None:
    env = dict(clean_env, KV_ADDRESS=address, KV_AUTHKEY=authkey.decode())
    apps = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.aio_app"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        ports = []
        for app in apps:
            assert app.stdout is not None
            line = app.stdout.readline()
            assert line.strip().isdigit(), (line, app.stderr and app.stderr.read())
            ports.append(int(line))
        calls = [(ports[i % 2], "/hit/home" if i % 3 else "/rmw/home") for i in range(N_REQUESTS)]
        with ThreadPoolExecutor(32) as pool:
            replies = list(pool.map(lambda c: _request(c[0], "POST", c[1]), calls))
        counts: dict[str, list[int]] = {"/hit/home": [], "/rmw/home": []}
        for reply, (_, path) in zip(replies, calls, strict=True):
            counts[path].append(reply["count"])
        hits, rmws = sorted(counts["/hit/home"]), sorted(counts["/rmw/home"])
        # Each request saw its own count: none lost, none applied twice, none read stale.
        assert hits == list(range(1, len(hits) + 1)) and len(hits) == 200
        assert rmws == list(range(1, len(rmws) + 1)) and len(rmws) == 100
        assert _request(ports[0], "GET", "/hits/home") == {"page": "home", "count": 200, "rmw": 100}
        with kvclient.connect(address, authkey) as kv:
            assert kv.dict("hits").copy() == {"home": 200, "rmw:home": 100}
    finally:
        for app in apps:
            app.terminate()
        outcomes = [app.communicate(timeout=30) for app in apps]
    # uvicorn shuts down gracefully (the lifespan closes the client), then re-raises SIGTERM.
    assert [app.returncode for app in apps] == [-signal.SIGTERM] * 2, outcomes
    assert not any("Traceback" in err for _, err in outcomes), outcomes
