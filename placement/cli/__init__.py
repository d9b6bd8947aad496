"""``moeplace`` command line: builds the app from each stage's ``register(app)``; commands only parse and call
the library."""

from __future__ import annotations

import importlib
import time

import typer

# Each module defines ``register(app)`` adding its commands.
COMMAND_MODULES = (
    "placement.cli.trace",  # import, stats, graph
    "placement.cli.plan",  # plan, eval
    "placement.cli.replan",  # replan
    "profiler.cli",  # profile
    "placement.cli.runtime",  # ep-bench
    "placement.cli.export",  # export, report
    "placement.cli.demo",  # demo
    "placement.cli.serve",  # serve
)
MAIN_STARTED: list[float] = []  # when ``main`` began (perf_counter): ``moeplace plan --time-limit`` counts from it


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="moeplace",
        help="Expert-placement optimiser and routing profiler for Mixture-of-Experts models.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},  # subcommands inherit it
        rich_markup_mode=None,
    )
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)
    return app


def main() -> None:
    MAIN_STARTED.append(time.perf_counter())  # before the commands' imports (seconds on a busy machine)
    build_app()()
