"""Shared CLI plumbing: one-line errors with exit code 1, progress bars, JSON output."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from placement.plan import PlanError, json_default
from placement.trace.outputs import OutputError, os_error_line
from placement.trace.schema import TraceError


class UserError(ValueError):
    """A CLI usage problem that is not a trace or plan error (bad option, existing output, ...)."""


def fail(message: str) -> typer.Exit:
    """Print one ``error:`` line to stderr and return the Exit to raise (exit code 1)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's validation errors (ValueError subclasses with one-line messages) and every OS error
    (a full disk, a read-only or vanished directory) into one ``error:`` line and exit code 1."""
    try:
        yield
    except (TraceError, PlanError, UserError, OutputError) as exc:
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(os_error_line(exc)) from None
    except ValueError as exc:
        if type(exc).__name__.endswith("Error") and type(exc) is not ValueError:
            raise fail(str(exc)) from None
        raise


def progress(transient: bool = True) -> Progress:
    """A rich progress bar on stderr (hidden when stderr is not a terminal)."""
    from rich.console import Console

    console = Console(stderr=True)
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f}"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
        transient=transient,
        disable=not console.is_terminal,
    )


def echo_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=json_default)
    sys.stdout.write("\n")
