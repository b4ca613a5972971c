"""``kvctl``: read and write a kvserve server from the shell (parse, call kvclient, print)."""

from __future__ import annotations

from typing import Annotated

import typer

import kvclient

app = typer.Typer(add_completion=False, help="Read and write a kvserve server.")


@app.command("get")
def get(key: str, dict_name: Annotated[str, typer.Option("--dict", "-d")] = "default") -> None:
    """Print the value of KEY."""
    with kvclient.connect() as kv:
        typer.echo(kv.dict(dict_name)[key])


@app.command("set")
def set_(
    key: str, value: str, dict_name: Annotated[str, typer.Option("--dict", "-d")] = "default"
) -> None:
    """Store VALUE (a string) under KEY."""
    with kvclient.connect() as kv:
        kv.dict(dict_name)[key] = value
