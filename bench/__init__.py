"""kvmanager benchmarks: kvserve against the stdlib manager, a raw-socket floor and Redis.

Run by hand (``python -m bench``), never by the test suite. See ``bench/README.md`` for how to
run it and how to read the tables it writes to ``bench/results/``.
"""
