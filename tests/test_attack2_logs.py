"""attack2: a client-chosen method name must not forge log lines (text or json)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.test_faults_wire import Target, _request, make_target  # noqa: F401
from tests.wire import authed_connection

pytestmark = pytest.mark.timeout(60)

FORGED = "x\n2099-01-01 00:00:00,000 kvserve CRITICAL forged"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_attack2_a_slow_request_method_name_cannot_forge_a_log_line(
    make_target: Callable[..., Target],  # noqa: F811
    fmt: str,
) -> None:
    target = make_target("--slow-ms", "0", "--log-format", fmt)
    sock = authed_connection(target.address, target.authkey)
    assert len(FORGED) <= 64
    reply = _request(sock, [None, FORGED, [], None])
    assert reply[0] == "#ERROR"
    reply = _request(sock, ["precious", FORGED, [], None])
    assert reply[0] == "#ERROR"
    sock.close()
    target.assert_serving()
    target.proc.terminate()
    _, err = target.proc.communicate(timeout=15)
    lines = err.splitlines()
    forged = [line for line in lines if line.startswith("2099-01-01")]
    assert not forged, f"forged log lines: {forged}"
    if fmt == "json":
        for line in lines:
            json.loads(line)
