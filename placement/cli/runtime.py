"""``moeplace ep-bench``: replay a trace's routing, or run a live model's prompts, through the expert-parallel
runtime under a plan."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from placement.cli.common import echo_json, fail, user_errors

RUN_MODES = ("home", "follow", "both")


def _pair_table(title: str, pair_GG: np.ndarray) -> list[str]:
    G = pair_GG.shape[0]
    lines = [f"  {title} (bytes, row = source rank, column = destination rank)"]
    lines.append("    src\\dst " + "".join(f"{g:>12d}" for g in range(G)))
    for s in range(G):
        lines.append(f"    {s:>7d} " + "".join(f"{int(v):>12,d}" for v in pair_GG[s]))
    return lines


def _text_report(rep: Any) -> str:
    ms_L = rep.layer_seconds_L * 1e3
    ph = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in rep.to_dict()["phase_seconds"].items())
    lines = [
        f"mode {rep.mode}: {rep.num_ranks} ranks, {rep.num_tokens:,} tokens, {rep.token_bytes} bytes per row",
        *_pair_table("measured", rep.pair_bytes(True)),
        *_pair_table("predicted (metrics.traffic x token bytes)", rep.pair_bytes(False)),
        f"  cross-rank bytes: measured {rep.cross_rank_bytes:,}, predicted {rep.predicted_bytes:,}, "
        f"equal per layer, phase and pair: {'yes' if rep.bytes_equal else 'NO'}",
        f"  meta bytes (ids, gates, counts): {rep.meta_bytes:,}",
        f"  max relative output error vs dense reference: {rep.max_rel_error:.2e}",
        f"  wall time per MoE layer: mean {ms_L.mean():.2f} ms, max {ms_L.max():.2f} ms",
        f"  time summed over layers: {ph}",
    ]
    return "\n".join(lines)


def _live_lines(rep: Any) -> str:
    g_ms = rep.gather_seconds_L * 1e3
    return "\n".join(
        [
            f"  live model: {rep.num_prompts} prompts; routing decided on the ranks, "
            f"(token, layer) pairs routed unlike the single-process model: {rep.routing_mismatch}",
            f"  all-gather for attention (not in the evaluator's model): {rep.gather_bytes:,} bytes, "
            f"{g_ms.mean():.2f} ms per MoE layer",
        ]
    )


def _run_live(
    model: str,
    plan_path: Path,
    ranks: int,
    modes: tuple[str, ...],
    prompts: str,
    limit: int,
    max_len: int,
    repeats: int,
) -> list[Any]:
    from placement.plan import Plan
    from placement.runtime.dispatch import EPError
    from placement.runtime.launch import live_bench
    from placement.runtime.live import LiveJob
    from profiler.api import load_prompts

    if limit < 1:
        raise EPError(f"--limit {limit}: must be >= 1")
    p = Plan.load(plan_path)
    texts = load_prompts(prompts)[:limit]
    jobs = [LiveJob(m, p, m) for m in modes]
    return live_bench(model, jobs, ranks, texts, max_len=max_len, repeats=repeats)


def _migrate_text(rep: Any) -> str:
    """Text of a ``migrate.MigrateReport``: the forward before, the migration, the forward after."""
    parts = []
    for title, fwd in (
        ("before the migration (--plan)", rep.before),
        ("after the migration (--migrate-to)", rep.after),
    ):
        job = getattr(fwd, "job", fwd)
        parts.append(f"{title}\n{_text_report(job)}" + (f"\n{_live_lines(fwd)}" if job is not fwd else ""))
    d = rep.to_dict()
    parts.append(
        "\n".join(
            [
                f"migration: {rep.num_moves} expert copies in {rep.num_rounds} rounds, {rep.expert_bytes:,} bytes "
                f"each; at most {rep.peak_held} distinct experts of one layer on a rank ({rep.slots_per_gpu} slots)",
                *_pair_table("weight bytes sent", rep.measured_bytes_GG),
                f"  weight bytes: sent {d['measured_bytes_total']:,}, received {d['received_bytes_total']:,}, "
                f"move list {d['listed_bytes_total']:,}; equal per rank pair: {'yes' if rep.bytes_equal else 'NO'}",
                f"  migration wall time: {rep.seconds * 1e3:.1f} ms",
            ]
        )
    )
    return "\n".join(parts)


def _moves(path: Path | None) -> Any:
    from placement.replan.moves import MoveList

    return None if path is None else MoveList.from_json(path.read_text(), where=str(path)).moves


def register(app: typer.Typer) -> None:
    @app.command("ep-bench")
    def ep_bench_cmd(
        plan: Annotated[Path, typer.Option("--plan", help="Plan JSON written by `moeplace plan`.")],
        ranks: Annotated[int, typer.Option("--ranks", help="Number of EP ranks; must equal the plan's GPUs.")],
        trace: Annotated[str, typer.Option("--trace", help="Trace: Parquet dataset/shard or .npz[:ARRAY].")] = "",
        mode: Annotated[
            str, typer.Option("--mode", help="Communication model: home, follow, or both (one launch).")
        ] = "home",
        tokens: Annotated[int, typer.Option("--tokens", help="Replay the first N tokens of the trace.")] = 2048,
        hidden: Annotated[int, typer.Option("--hidden", help="Hidden size of the random experts.")] = 256,
        ffn: Annotated[int, typer.Option("--ffn", help="Expert FFN size (default hidden / 2).")] = 0,
        seed: Annotated[int, typer.Option("--seed", help="Seed of the expert weights and inputs.")] = 0,
        repeats: Annotated[int, typer.Option("--repeats", help="Runs per mode; times are medians.")] = 1,
        backend: Annotated[str, typer.Option("--backend", help="auto (nccl if CUDA), gloo or nccl.")] = "auto",
        as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
        model: Annotated[
            str, typer.Option("--model", help="Run a live model instead of a trace: builtin or hf-config:NAME.")
        ] = "",
        prompts: Annotated[str, typer.Option("--prompts", help="--model: builtin, .txt or .jsonl.")] = "builtin",
        limit: Annotated[int, typer.Option("--limit", help="--model: run the first N prompts.")] = 16,
        max_len: Annotated[int, typer.Option("--max-len", help="--model: tokens per prompt at most.")] = 256,
        migrate_to: Annotated[
            Path | None,
            typer.Option(
                "--migrate-to",
                help="Run under --plan, move the running ranks' expert weights to this plan, run again (one --mode).",
            ),
        ] = None,
        moves: Annotated[
            Path | None,
            typer.Option("--moves", help="--migrate-to: move list JSON (default: placement.replan's for the plans)."),
        ] = None,
    ) -> None:
        """Replay a trace's routing (--trace) or run a live model's prompts (--model) through R
        expert-parallel ranks under a plan.

        Reports measured cross-rank bytes per rank pair vs the evaluator's prediction, the max relative
        error vs a single-process dense reference (hidden states, or logits of the live model), and wall
        time per MoE layer. With --model every rank holds the dense parts and only its slots' experts, routes
        its own tokens live, and predictions come from the routing the run recorded (gloo on CPU).

        With --migrate-to the ranks then copy expert weights to each other by the move list, round by round,
        and run again under the new plan: weight bytes sent and received are compared with the list's, and
        both runs with the reference."""
        from placement.plan import Plan
        from placement.runtime.dispatch import EPError
        from placement.runtime.launch import ep_bench
        from placement.runtime.replay import EPJob, ModelSpec
        from placement.trace.dataset import open_trace

        with user_errors():
            if mode not in RUN_MODES:
                raise EPError(f"--mode {mode!r}: use one of {', '.join(RUN_MODES)}")
            if bool(trace) == bool(model):
                raise EPError("pass exactly one of --trace TRACE (replay) and --model MODEL (live prompts)")
            modes = ("home", "follow") if mode == "both" else (mode,)
            if tokens < 1:
                raise EPError(f"--tokens {tokens}: must be >= 1")
            if migrate_to is not None and len(modes) != 1:
                raise EPError("--migrate-to runs one --mode: home or follow")
            if moves is not None and migrate_to is None:
                raise EPError("--moves needs --migrate-to PLAN")
        if model and migrate_to is not None:
            from placement.runtime.migrate import live_migrate_bench
            from profiler.api import load_prompts

            with user_errors():
                if limit < 1:
                    raise EPError(f"--limit {limit}: must be >= 1")
                plans = Plan.load(plan), Plan.load(migrate_to)
                texts = load_prompts(prompts)[:limit]
                rep = live_migrate_bench(model, *plans, ranks, texts, moves=_moves(moves), mode=mode, max_len=max_len)
            _migrate_out(rep, as_json, {"plan": str(plan), "migrate_to": str(migrate_to), "model": model})
            return
        if model:
            with user_errors():
                live = _run_live(model, plan, ranks, modes, prompts, limit, max_len, repeats)
            if as_json:
                echo_json({"plan": str(plan), "model": model, "reports": [r.to_dict() for r in live]})
            else:
                typer.echo("\n".join(f"{_text_report(r.job)}\n{_live_lines(r)}" for r in live))
            if not all(r.job.bytes_equal for r in live):
                raise fail("measured bytes differ from the evaluator's prediction (a runtime or evaluator bug)")
            return
        with user_errors():
            p = Plan.load(plan)
            tr = open_trace(trace)
            p.check_trace(tr.meta, where=str(plan))
            routes = tr.read_all(with_gates=True)
            n = min(tokens, routes.num_tokens)
            sub = routes.take(np.arange(n))
            spec = ModelSpec(hidden=hidden, ffn=ffn or max(1, hidden // 2), seed=seed)
            if migrate_to is not None:
                from placement.runtime.migrate import migrate_bench

                p_b, mv = Plan.load(migrate_to), _moves(moves)
                ids, gates = sub.expert_ids_TLK, sub.gate_weights_TLK
                rep = migrate_bench(
                    p, p_b, ids, ranks, moves=mv, gates_TLK=gates, mode=mode, model=spec, backend=backend
                )
            else:
                jobs = [EPJob(m, p, m, sub.expert_ids_TLK, sub.gate_weights_TLK) for m in modes]
                reports = ep_bench(jobs, ranks, spec, backend=backend, repeats=repeats)
        if migrate_to is not None:
            _migrate_out(rep, as_json, {"plan": str(plan), "migrate_to": str(migrate_to), "trace": trace})
            return
        if as_json:
            echo_json(
                {
                    "plan": str(plan),
                    "trace": trace,
                    "hidden": hidden,
                    "reports": [r.to_dict() for r in reports],
                }
            )
        else:
            typer.echo("\n".join(_text_report(r) for r in reports))
        if not all(r.bytes_equal for r in reports):
            raise fail("measured bytes differ from the evaluator's prediction (a runtime or evaluator bug)")


def _migrate_out(rep: Any, as_json: bool, head: dict[str, Any]) -> None:
    if as_json:
        echo_json(head | rep.to_dict())
    else:
        typer.echo(_migrate_text(rep))
    jobs = [getattr(f, "job", f) for f in (rep.before, rep.after)]
    if not (rep.bytes_equal and all(j.bytes_equal for j in jobs)):
        raise fail("measured bytes differ from the move list or the evaluator (a runtime or evaluator bug)")
