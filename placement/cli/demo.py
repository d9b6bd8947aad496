"""``moeplace demo``: the whole product end to end on the shipped model, offline (placement.demo)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

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
    """Profile the shipped MoE model, plan with every solver, evaluate on held-out prompts, compare.

    Progress goes to stderr: a progress bar on a terminal, else one line per step. The comparison table (or
    --json) goes to stdout.
    """
    from rich.console import Console

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
            steps = _Steps(bar, console.is_terminal)
            res = run_demo(out, counts, time_limit, on_progress=steps.tokens, on_step=steps.step)
            report_path = None
            if report:
                from placement.report import build_report

                steps.step(f"writing the HTML report of all {len(res.plans)} plans")
                report_path = out / "report.html"
                paths = [str(out / "plans" / f"{name}.json") for name in res.plans]
                build_report(res.trace_dir, paths, "moeplace demo", prompts="test").write(report_path)
    if as_json:
        from placement.demo import best_rows, takeaway

        best = set(best_rows(res.rows))
        rows = [{**r, "best": i in best} for i, r in enumerate(res.rows)]
        echo_json(
            {
                "stats": res.stats["summary"],
                "prompts": res.prompts,
                "rows": rows,
                "takeaway": takeaway(res.rows),
                "seconds": res.seconds,
            }
        )
        return
    s = res.stats["summary"]
    console.print(
        f"trace: {res.trace_dir} ({res.stats['num_tokens']:,} tokens, {res.stats['num_layers']} MoE layers x "
        f"{res.stats['num_experts']} experts, top-{res.stats['top_k']}); adjacent-layer concentration "
        f"{s['concentration_mean']:.3f} vs {s['independent_mean']:.3f} if layers were independent"
    )
    _print_comparison(res, console)
    tail = f"; report: {report_path}" if report_path else ""
    console.print(f"plans: {out / 'plans'}{tail}; total {res.seconds['total']:.1f} s")


class _Steps:
    """Progress of the demo: the rich bar on a terminal, else plain lines on stderr (a redirected run is never
    silent for long): each step, and the profiled tokens every few seconds."""

    EVERY_S = 5.0  # at most one profiling line per this many seconds

    def __init__(self, bar: Any, on_terminal: bool) -> None:
        self.bar, self.plain = bar, not on_terminal
        self.task = bar.add_task("profiling", total=None, rate="")
        self.t0 = self.last = time.perf_counter()
        self.done = 0

    def _line(self, msg: str) -> None:
        self.last = time.perf_counter()
        typer.echo(f"[{self.last - self.t0:6.1f} s] {msg}", err=True)

    def step(self, msg: str) -> None:
        self.bar.update(self.task, description=msg)
        if self.plain:
            self._line(msg)

    def tokens(self, n: int, total: int) -> None:
        self.bar.update(self.task, total=total, advance=n)
        self.done += n
        if self.plain and (time.perf_counter() - self.last >= self.EVERY_S or self.done >= total):
            self._line(f"profiled {self.done:,} of about {total:,} tokens")


LEGEND = (
    "colocation ↑   share of a token's layer-to-layer expert steps that stay on one GPU (higher is better)",
    "imbalance max ↓  load of the busiest GPU / mean GPU load, worst layer (1.00 = perfect)",
    "home B/tok ↓   all-to-all bytes per token under standard expert parallelism (lower is better)",
    "status         optimal: proven best cost on the fitted prompts; feasible: the ILP's best within its time; "
    "heuristic: a fast algorithm's plan",
    "gap ↓          how far the plan's cost (token steps between layers that change GPU) may be above the best "
    "possible; 0 = proven optimal",
    "★ best         per GPU count, the highest colocation among plans with imbalance max <= 1.10 (the demo's "
    "balance); else the lowest imbalance",
)


def _print_comparison(res: Any, console: Any) -> None:
    """The comparison table on stdout, with what its columns mean, the best plans marked and the takeaway."""
    from rich.console import Console
    from rich.table import Table

    from placement.demo import best_rows, takeaway

    best = set(best_rows(res.rows))
    t = Table(title=f"Plans evaluated on {res.prompts}")
    for col in ("GPUs", "solver", "status", "gap ↓", "solve s", "colocation ↑", "imbalance max ↓", "home B/tok ↓"):
        t.add_column(col, justify="right")
    t.add_column("best", justify="center")
    for i, r in enumerate(res.rows):
        if r["status"] == "no plan":
            t.add_row(str(r["gpus"]), r["solver"], "no plan", "-", "-", "-", "-", "-", "")
            console.print(f"{r['solver']} for {r['gpus']} GPUs: {r['error']}")
            continue
        t.add_row(
            str(r["gpus"]),
            r["solver"],
            str(r["status"]),
            "–" if r["gap"] is None else f"{r['gap']:.3f}",
            f"{r['solve_s']:.2f}",
            f"{r['colocation']:.3f}",
            f"{r['imbalance_max']:.3f}",
            f"{r['home_bytes_per_token']:,.0f}",
            "★" if i in best else "",
        )
    out = Console(width=None if Console().is_terminal else 140)
    out.print(t)
    for line in LEGEND:
        out.print(line, highlight=False)
    out.print(f"Takeaway: {takeaway(res.rows)}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("demo", help="Run the whole pipeline on the shipped demo model (offline, a few minutes).")(demo_cmd)
