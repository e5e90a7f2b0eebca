"""What every group of commands shares: the console, failing with a message, the stack a
command talks to, and parsing the small values typed on a command line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from disagfusion.config import Settings
from disagfusion.launcher import Launcher

console = Console()

DataDir = Annotated[Path, typer.Option("--data-dir", help="Where the embedded stack keeps its state and logs.")]
DEFAULT_DATA_DIR = Path(".df")


def fail(message: str) -> NoReturn:
    """Print ``message`` as an error and exit with status 1."""
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(1)


def client_settings(data_dir: Path) -> Settings:
    """Settings from the environment; without DF_NATS_URL, talk to the embedded stack if one runs."""
    launcher = Launcher(data_dir)
    if "DF_NATS_URL" not in os.environ and launcher.state() is not None:
        return launcher.client_settings()
    return Settings()


def progress() -> Progress:
    """A progress bar with a description, the count done and the time taken."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)


def validation_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    return f"{'.'.join(map(str, first['loc']))}: {first['msg']}"


def parse_scales(pairs: list[str]) -> dict[str, int]:
    """``["dit=2", "encoder=1"]`` as ``{"dit": 2, "encoder": 1}``."""
    scales = {}
    for pair in pairs:
        service, _, count = pair.partition("=")
        if not count.isdigit():
            fail(f"expected SERVICE=COUNT, got {pair!r}")
        scales[service] = int(count)
    return scales


def parse_size(size: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` as (width, height)."""
    width, _, height = size.lower().partition("x")
    if not (width.isdigit() and height.isdigit()):
        fail(f"--size must look like 256x256 (WIDTHxHEIGHT), got {size!r}")
    return int(width), int(height)
