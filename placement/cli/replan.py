"""``moeplace replan``: parse options, call placement.replan (migration-aware re-planning)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from placement.cli.common import UserError, echo_json, user_errors
from placement.cli.plan import TraceArg, load_graph_and_routes
from placement.cli.trace import AddressOpt, RayOpt, WorkersOpt, ray_graph
from placement.trace.outputs import check_output


def replan_cmd(
    current: Annotated[Path, typer.Option("--current", help="The deployed plan (JSON written by `moeplace plan`).")],
    trace: TraceArg,
    out: Annotated[Path, typer.Option("--out", help="New plan JSON to write (atomically; its directory must exist).")],
    max_moves: Annotated[
        int | None,
        typer.Option("--max-moves", help="Most expert copies onto GPUs that lack them (0 keeps the current plan)."),
    ] = None,
    moves_out: Annotated[
        Path | None, typer.Option("--moves-out", help="Write the move list (rounds, bytes) as JSON here.")
    ] = None,
    expert_bytes: Annotated[
        int | None, typer.Option("--expert-bytes", help="Bytes of one expert's weights (for bytes moved).")
    ] = None,
    hf_config: Annotated[
        Path | None,
        typer.Option("--hf-config", help="Hugging Face model dir or config.json giving the expert size instead."),
    ] = None,
    balance: Annotated[
        float | None,
        typer.Option("--balance", help="Load tolerance eps on unseen prompts (default: what the target plan reaches)."),
    ] = None,
    time_limit: Annotated[float, typer.Option("--time-limit", help="Seconds for the whole re-plan.")] = 10.0,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    exact: Annotated[
        str, typer.Option("--exact", help="Exact bounded-move model: auto (where it fits), off, cpsat or pulp.")
    ] = "auto",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print before/after scores and the decision as JSON.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out / --moves-out.")] = False,
    ray: RayOpt = False,
    address: AddressOpt = None,
    workers: WorkersOpt = 2,
) -> None:
    """Re-plan the deployed plan for recent traffic, moving at most --max-moves experts."""
    from placement.graph import PROMPT_FOLDS
    from placement.plan import Plan
    from placement.replan import replan
    from placement.replan.moves import expert_bytes_from_hf_config, save_moves

    with user_errors():
        if expert_bytes is not None and hf_config is not None:
            raise UserError("--expert-bytes and --hf-config both give the expert size; pass one of them")
        if expert_bytes is not None and expert_bytes < 0:
            raise UserError(f"--expert-bytes {expert_bytes}: must be >= 0")
        size = expert_bytes_from_hf_config(hf_config) if hf_config is not None else (expert_bytes or 0)
        cur = Plan.load(current)
        from placement.trace.dataset import open_trace

        tr = open_trace(trace)
        cur.check_trace(tr.meta, where=str(current))
        check_output(out, force=force)  # before the re-plan, not after it
        if moves_out is not None:
            check_output(moves_out, force=force, flag="--moves-out")
        if ray:
            g = ray_graph(tr, False, address, workers, num_folds=PROMPT_FOLDS)
        else:
            g, _ = load_graph_and_routes(tr, "all", 0.5, 0, need_routes=False, num_folds=PROMPT_FOLDS)
        res = replan(
            cur,
            g,
            max_moves=max_moves,
            expert_bytes=size,
            balance_eps=balance,
            time_limit=time_limit,
            seed=seed,
            exact=exact,
        )
        res.plan.save(out)
        if moves_out is not None:
            save_moves(res.moves, moves_out)
    if as_json:
        echo_json({**res.summary(), "num_rounds": res.moves.num_rounds, "out": str(out)})
        return
    _print(res.before, res.after, res.moves.num_rounds)
    typer.echo(f"wrote {out}{f' and {moves_out}' if moves_out else ''}: {res.reason}")


def _print(before: dict[str, Any], after: dict[str, Any], rounds: int) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="re-plan")
    for col in ("", "before", "after"):
        t.add_column(col, justify="right" if col else "left")
    t.add_row(
        "forecast imbalance_max (unseen)", f"{before['forecast_imbalance']:.4f}", f"{after['forecast_imbalance']:.4f}"
    )
    t.add_row("imbalance_max (trace)", f"{before['imbalance_max']:.4f}", f"{after['imbalance_max']:.4f}")
    t.add_row("colocation (trace)", f"{before['colocation']:.4f}", f"{after['colocation']:.4f}")
    t.add_row("moves", "", f"{after['moves']:,}")
    t.add_row("bytes moved", "", f"{after['bytes']:,}")
    t.add_row("rounds (one spare slot per GPU)", "", f"{rounds:,}")
    if after.get("status") is not None:
        gap = after.get("gap")
        t.add_row("exact model", "", f"{after['status']}" + ("" if gap is None else f", gap {gap:.4f}"))
    Console().print(t)


def register(app: typer.Typer) -> None:
    app.command(
        "replan", help="Re-plan a deployed plan for recent traffic within a move budget; writes the move list."
    )(replan_cmd)
