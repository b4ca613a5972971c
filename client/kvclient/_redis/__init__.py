"""The Valkey/Redis backend: kvclient's API on a Redis Cluster or a standalone server.

``kvclient.connect("redis-cluster://h1:7000,h2:7000")`` (or ``redis://host:6379/0``,
``rediss://`` for TLS) returns a :class:`~kvclient.client.Client` whose proxies are the usual
ones; only the backend under them differs:

- :mod:`._nodes`: connections straight to each slot's master, ``MOVED``/``ASK`` followed,
  redis-py's own retries off;
- :mod:`._backend`: :class:`~._backend.RedisBackend`, the runner's ``call`` made as scripts,
  request ids checked and recorded inside them, kvclient's ``Retry`` the only retry loop;
- :mod:`.kinds`: one module of handlers per container kind, and :mod:`.scripts` its Lua;
- :mod:`._server`: create, names, describe, drop, ping, stats;
- :mod:`.client`: :func:`~.client.connect_redis` and the client class;
- :mod:`.aio` and :mod:`._bridge`: the same backend for ``kvclient.aio``, its IO on
  ``redis.asyncio`` (each call's logic in a greenlet).

Needs redis-py: ``pip install 'kvmanager[redis]'``.
"""
