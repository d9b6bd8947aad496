"""``moeplace export`` and ``moeplace report``: thin shells over placement.deploy.export and placement.report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from placement.cli.common import UserError, user_errors
from placement.trace.outputs import check_output

__all__ = ["register"]


def export_cmd(
    plan: Annotated[Path, typer.Option(help="Plan JSON written by `moeplace plan`.")],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="sglang, vllm (files for vLLM forks; vLLM 0.33 itself serves a permute-checkpoint), deepseek or "
            "permute-checkpoint (docs/deploy.md).",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="Output: .json/.pt file (sglang), directory (vllm, permute-checkpoint), .pt (deepseek); "
            "its parent directory must exist."
        ),
    ],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    num_model_layers: Annotated[
        int | None,
        typer.Option(min=1, help="sglang: the model's layer count incl. dense layers (default: last MoE layer + 1)."),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="permute-checkpoint: Hugging Face safetensors model directory to rewrite."),
    ] = None,
) -> None:
    """Export PLAN for a serving system (SGLang, vLLM, DeepSeek EPLB) or as a permuted checkpoint."""
    from placement.deploy.export import ExportError, export
    from placement.plan import Plan

    with user_errors():
        try:
            p = Plan.load(plan)
            res = export(p, format, out, force=force, num_model_layers=num_model_layers, checkpoint=checkpoint)
        except ExportError as exc:
            raise UserError(str(exc)) from None
    for w in res.warnings:
        typer.echo(f"warning: {w}", err=True)
    for path in res.paths:
        typer.echo(f"wrote {path}", err=True)
    if res.flags:
        launch = res.info.get("launch")
        typer.echo(f"launch flags for `{launch} ...`:" if launch else "launch flags:", err=True)
        for f in res.flags:
            typer.echo(f)


def report_cmd(
    trace: Annotated[str, typer.Option(help="Trace dataset directory, shard, or .npz.")],
    out: Annotated[
        Path, typer.Option(help="HTML file to write (its directory must exist); PNGs are written next to it.")
    ] = Path("report.html"),
    plan: Annotated[list[Path] | None, typer.Option(help="Plan JSON to compare (repeat for several).")] = None,
    title: Annotated[str | None, typer.Option(help="Page title.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing report.")] = False,
    prompts: Annotated[
        str,
        typer.Option(
            help="Prompts to show and evaluate on: all, train or test (the seeded split of plan/eval --prompts)."
        ),
    ] = "all",
    train_fraction: Annotated[float, typer.Option(help="Share of prompts in the train split.")] = 0.5,
    split_seed: Annotated[int, typer.Option(help="Seed of the train/test prompt split.")] = 0,
) -> None:
    """Render a self-contained HTML report of TRACE (loads, transitions) and of each PLAN on it."""
    from placement.report import build_report

    with user_errors():
        if out.suffix.lower() not in (".html", ".htm"):
            raise UserError(f"--out {out}: name the report *.html")
        check_output(out, force=force)
        report = build_report(trace, [str(p) for p in plan or []], title, prompts, train_fraction, split_seed)
        for png in report.png_paths(out):  # the figures follow the page's rule: never replaced without --force
            check_output(png, force=force)
        paths = report.write(out)
    typer.echo(f"wrote {paths[-1]} and {len(paths) - 1} PNGs next to it", err=True)


def register(app: typer.Typer) -> None:
    """Add the ``export`` and ``report`` commands to ``app``."""
    app.command("export")(export_cmd)
    app.command("report")(report_cmd)
