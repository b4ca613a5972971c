"""kvserve: the kvmanager server.

Run it with ``kvserve --port 50000`` (see ``kvserve --help``), or embed it::

    from kvserve import KVManager
    server = KVManager(("127.0.0.1", 0), authkey=b"...").get_server()
    server.serve_forever()
"""

from __future__ import annotations

from kvproto._version import __version__
from kvserve.containers import KVDict, KVList, KVNamespace, KVQueue
from kvserve.manager import KVManager
from kvserve.server import Server

__all__ = ["KVDict", "KVList", "KVManager", "KVNamespace", "KVQueue", "Server", "__version__"]
