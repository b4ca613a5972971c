"""The protocol package on its own: layering, the schema, framing. No server needed."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from kvproto import schema, wire
from kvproto.errors import ProtocolError
from kvserve.containers import KINDS, Container
from kvserve.sync import SYNC_KINDS

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {
    "kvproto": REPO / "protocol" / "kvproto",
    "kvserve": REPO / "server" / "kvserve",
    "kvclient": REPO / "client" / "kvclient",
}
# Who may import whom: client -> protocol <- server.
ALLOWED = {
    "kvproto": {"kvproto"},
    "kvserve": {"kvproto", "kvserve"},
    "kvclient": {"kvproto", "kvclient"},
}


def _is_module(name: str) -> bool:
    package, _, rest = name.partition(".")
    return bool(rest) and package in PACKAGES and (PACKAGES[package] / f"{rest}.py").exists()


def _imports(path: Path) -> set[str]:
    """Every module of ours that ``path`` imports, at any level (TYPE_CHECKING included).

    ``from kvclient import _flows`` is an import of ``kvclient._flows``, not of the package.
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if _is_module(sub) else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_each_package_imports_only_what_its_layer_may(package: str) -> None:
    wrong = {
        f"{path.name} imports {module}"
        for path in PACKAGES[package].glob("*.py")
        for module in _imports(path)
        if module.split(".")[0] not in ALLOWED[package]
    }
    assert not wrong


def _module_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for package, root in PACKAGES.items():
        for path in root.glob("*.py"):
            if path.stem == "__init__":
                # A package's __init__ names its modules lazily (PEP 562, TYPE_CHECKING):
                # those are not imports that run when it loads. Edges *to* it still count.
                graph[package] = set()
                continue
            name = f"{package}.{path.stem}"
            graph[name] = {m for m in _imports(path) if m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_the_import_graph_has_no_cycle() -> None:
    # Lazy imports inside functions count too: a cycle through one is still a cycle.
    assert not _cycles(_module_graph())


def test_the_cycle_check_sees_every_form_of_import(tmp_path: Path) -> None:
    # `from pkg import mod` is an edge to pkg.mod: a cycle made of that form is found.
    graph = {"kvclient._a": {"kvclient._b"}, "kvclient._b": {"kvclient._a"}, "kvclient": set()}
    assert _cycles(graph) == [["kvclient._a", "kvclient._b", "kvclient._a"]]
    probe = tmp_path / "probe.py"
    probe.write_text("from kvclient import _runner\nfrom kvclient._backend import x\n")
    assert _imports(probe) == {"kvclient._runner", "kvclient._backend"}


def test_importing_the_server_loads_no_client_module() -> None:
    code = (
        "import sys, kvserve, kvserve.server, kvserve.manager, kvserve.__main__;"
        "print(sorted(m for m in sys.modules if m.startswith('kvclient')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_importing_kvproto_loads_nothing_else_of_ours_and_no_msgpack() -> None:
    code = (
        "import sys, kvproto;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('kvclient', 'kvserve', 'msgpack')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- the schema --------------------------------------------------------------------------------


ALL_KINDS = {**KINDS, **SYNC_KINDS}


def test_every_builtin_kind_is_in_the_schema_and_nothing_else_is() -> None:
    assert set(schema.KINDS) == set(ALL_KINDS)


@pytest.mark.parametrize("kind", sorted(ALL_KINDS))
def test_every_schema_operation_is_a_method_of_its_container(kind: str) -> None:
    cls = ALL_KINDS[kind]
    missing = [name for name in schema.KINDS[kind] if not callable(getattr(cls, name, None))]
    assert not missing
    assert cls.exposed == frozenset(schema.KINDS[kind])
    assert cls.mutating == {n for n, op in schema.KINDS[kind].items() if op.mutates}


@pytest.mark.parametrize("kind", sorted(ALL_KINDS))
def test_no_public_container_method_is_left_out_of_the_schema(kind: str) -> None:
    # A method a kind defines but the schema does not list can never be called: either it is
    # internal (a Container hook) or the schema forgot it.
    cls = ALL_KINDS[kind]
    hooks = {name for name, _ in inspect.getmembers(Container, callable)}
    defined = {
        name
        for name, _ in inspect.getmembers(cls, callable)
        if not name.startswith("_") and name not in hooks
    }
    extra = (
        defined - set(schema.KINDS[kind]) - {"evict", "evict_waiter", "expire_keys"}
    )  # replay-only
    assert not extra


def test_blocking_operations_say_where_their_wait_is() -> None:
    for kind, ops in schema.KINDS.items():
        for name, op in ops.items():
            if op.wait_arg is not None or op.block_arg is not None:
                assert op.blocks, (kind, name)


def test_a_server_op_that_polices_itself_is_one_the_engine_would_otherwise_refuse() -> None:
    assert {n for n, op in schema.SERVER.items() if op.own_policy} == {"create", "batch"}
    assert schema.op(None, "compact") is not None
    assert not schema.SERVER["compact"].is_logged
    assert schema.SERVER["drop"].is_logged


def test_op_lookup() -> None:
    assert schema.op("queue", "get") == schema.Op(
        mutates=True, blocks=True, wait_arg=1, block_arg=0, fenced=True
    )
    assert schema.op("dict", "get") == schema.Op()
    assert schema.op("dict", "nope") is None
    assert schema.op("nope", "get") is None


# -- framing -----------------------------------------------------------------------------------


def _frame(payload: bytes) -> bytes:
    return b"".join(wire.frame_parts(payload))


@pytest.mark.parametrize("size", [0, 1, 65536, 65537, 300_000])
def test_frame_parts_round_trip_through_the_decoder_byte_by_byte_and_whole(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    data = _frame(payload) + _frame(b"next")
    whole = wire.FrameDecoder(1 << 20)
    assert whole.feed(data) == [payload, b"next"]
    assert whole.buffered == 0
    if size <= 65537:
        trickle = wire.FrameDecoder(1 << 20)
        got = [frame for i in range(len(data)) for frame in trickle.feed(data[i : i + 1])]
        assert got == [payload, b"next"]


def test_the_decoder_refuses_a_large_header_before_its_payload_arrives() -> None:
    decoder = wire.FrameDecoder(100)
    assert decoder.feed(_frame(b"x" * 100)) == [b"x" * 100]
    with pytest.raises(wire.FrameTooLargeError) as info:
        decoder.feed(wire.HEADER.pack(101))
    assert (info.value.size, info.value.limit) == (101, 100)
    assert isinstance(info.value, ProtocolError)


def test_frame_end_says_incomplete_until_the_last_byte() -> None:
    data = _frame(b"abc")
    assert [wire.frame_end(data[:n], 0, 10) for n in range(len(data))] == [-1] * len(data)
    assert wire.frame_end(data, 0, 10) == len(data)


@pytest.mark.parametrize(
    "message",
    [
        None,
        [],
        [None, "ping"],
        [None, "ping", [], None, [b"t", 1], 6],
        [1, "get", [], None],
        ["x" * (wire.MAX_NAME + 1), "get", [], None],
        [None, "m" * (wire.MAX_METHOD + 1), [], None],
        [None, "ping", [], None, [b"", 1]],
        [None, "ping", [], None, [b"t" * 65, 1]],
        [None, "ping", [], None, [b"t", "1"]],
        [None, "ping", [], None, "rid"],
    ],
)
def test_parse_request_refuses_what_is_not_a_request(message: object) -> None:
    with pytest.raises(ProtocolError):
        wire.parse_request(message)


def test_parse_request_pops_the_request_id() -> None:
    message = ["d", "get", ["k"], None, [b"token", 7]]
    assert wire.parse_request(message) == [b"token", 7]
    assert message == ["d", "get", ["k"], None]
    assert wire.parse_request([None, "ping", [], None]) is None


def test_unwrap_reply() -> None:
    assert wire.unwrap_reply([wire.RETURN, 5]) == 5
    with pytest.raises(KeyError):
        wire.unwrap_reply([wire.ERROR, KeyError("k")])
    for bad in ([wire.ERROR, "not an exception"], ["#OTHER", 1], [wire.RETURN], None):
        with pytest.raises(wire.MalformedReplyError):
            wire.unwrap_reply(bad)


def test_watch_and_ttl_operations_name_their_feature() -> None:
    # A backend without them raises NotSupportedError, derived from the schema.
    for kind in ("dict", "list", "namespace", "queue"):
        assert schema.KINDS[kind]["watch"].feature == "watch"
        assert schema.KINDS[kind]["revision"].feature == "watch"
    ttl_ops = {m for m, o in schema.KINDS["dict"].items() if o.feature == "ttl"}
    assert ttl_ops == {"set", "set_ttl", "ttl", "persist", "renew"}
    assert schema.unsupported("dict", "get", "x") is None
    message = schema.unsupported("dict", "set_ttl", "the Valkey/Redis Cluster backend")
    assert message is not None and "'ttl'" in message and "Cluster" in message
