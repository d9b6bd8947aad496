"""``moeplace demo``: the whole product end to end on the shipped model, offline (placement.demo)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from placement.cli.common import echo_json, progress, user_errors
from placement.trace.outputs import check_output


def demo_cmd(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Working directory for the trace, plans and report: created (its parent must exist) or reused "
            "(the trace is resumed, plans and report are replaced).",
        ),
    ] = Path("moeplace-demo"),
    gpus: Annotated[str, typer.Option("--gpus", help="Comma-separated GPU counts to plan for.")] = "2,4,8",
    time_limit: Annotated[float, typer.Option("--time-limit", help="Time limit per solver run (s).")] = 5.0,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Write an HTML report.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON.")] = False,
) -> None:
    """Profile the shipped MoE model, plan with every solver, evaluate on held-out prompts, compare."""
    from rich.console import Console
    from rich.table import Table

    from placement.cli.common import UserError
    from placement.demo import run_demo

    console = Console(stderr=True, width=None if Console(stderr=True).is_terminal else 140)
    with user_errors():
        try:
            counts = tuple(int(x) for x in gpus.split(",") if x.strip())
        except ValueError:
            raise UserError(f"--gpus {gpus!r}: give comma-separated integers, e.g. 2,4,8") from None
        if not counts or min(counts) < 1:
            raise UserError(f"--gpus {gpus!r}: give at least one GPU count >= 1")
        check_output(out, kind="dataset")  # a working directory: created, or reused (its trace resumed)
        with progress() as bar:
            task = bar.add_task("profiling", total=None, rate="")

            def on_progress(n: int, total: int) -> None:
                bar.update(task, total=total, advance=n)

            res = run_demo(
                out,
                counts,
                time_limit,
                on_progress=on_progress,
                on_step=lambda msg: bar.update(task, description=msg),
            )
        report_path = None
        if report:
            from placement.report import build_report

            chosen = sorted((out / "plans").glob(f"*-g{counts[len(counts) // 2]}.json"))
            report_path = out / "report.html"
            build_report(res.trace_dir, [str(p) for p in chosen], "moeplace demo").write(report_path)
    if as_json:
        echo_json({"stats": res.stats["summary"], "rows": res.rows, "seconds": res.seconds})
        return
    s = res.stats["summary"]
    console.print(
        f"trace: {res.trace_dir} ({res.stats['num_tokens']:,} tokens, {res.stats['num_layers']} MoE layers x "
        f"{res.stats['num_experts']} experts, top-{res.stats['top_k']}); adjacent-layer concentration "
        f"{s['concentration_mean']:.3f} vs {s['independent_mean']:.3f} if layers were independent"
    )
    t = Table(title="Plans fitted on half the prompts, evaluated on the other half")
    for col in ("GPUs", "solver", "status", "gap", "solve s", "colocation", "imbalance max", "home B/tok"):
        t.add_column(col, justify="right")
    for r in res.rows:
        if r["status"] == "no plan":
            t.add_row(str(r["gpus"]), r["solver"], "no plan", "-", "-", "-", "-", "-")
            console.print(f"{r['solver']} for {r['gpus']} GPUs: {r['error']}")
            continue
        t.add_row(
            str(r["gpus"]),
            r["solver"],
            str(r["status"]),
            "-" if r["gap"] is None else f"{r['gap']:.3f}",
            f"{r['solve_s']:.2f}",
            f"{r['colocation']:.3f}",
            f"{r['imbalance_max']:.3f}",
            f"{r['home_bytes_per_token']:,.0f}",
        )
    Console(width=None if Console().is_terminal else 140).print(t)
    tail = f"; report: {report_path}" if report_path else ""
    console.print(f"plans: {out / 'plans'}{tail}; total {res.seconds['total']:.1f} s")


def register(app: typer.Typer) -> None:
    app.command("demo", help="Run the whole pipeline on the shipped demo model (offline, a few minutes).")(demo_cmd)
