"""``moeplace plan`` and ``moeplace eval``: parse options, call placement.planner / placement.metrics."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from placement.cli.common import UserError, echo_json, progress, user_errors
from placement.cli.trace import AddressOpt, RayOpt, WorkersOpt, ray_graph
from placement.trace.outputs import check_output

if TYPE_CHECKING:
    from placement.trace.dataset import Trace

TraceArg = Annotated[str, typer.Option("--trace", help="Trace: Parquet dataset dir/file or .npz[:ARRAY].")]
SplitOpt = Annotated[
    str,
    typer.Option(
        "--prompts",
        help="Which prompts of the trace to use: all, train or test (a seeded split by prompt, see --train-fraction).",
    ),
]
FractionOpt = Annotated[float, typer.Option("--train-fraction", help="Share of prompts in the train split.")]
SplitSeedOpt = Annotated[int, typer.Option("--split-seed", help="Seed of the train/test prompt split.")]
HardwareOpt = Annotated[
    str | None,
    typer.Option(
        "--hardware",
        help="Time model hardware: h100-nvlink-ib400 or h200-nvlink-ib400 (8-GPU NVLink nodes, 400 Gb/s "
        "InfiniBand), or a HardwarePreset JSON file. Default for --objective time: h100-nvlink-ib400.",
    ),
]
HfConfigOpt = Annotated[
    Path | None, typer.Option("--hf-config", help="Hugging Face config.json (or its directory) giving the model dims.")
]
HiddenOpt = Annotated[int | None, typer.Option("--hidden-size", help="Time model: the model's hidden size.")]
FfnOpt = Annotated[
    int | None, typer.Option("--expert-ffn-size", help="Time model: a routed expert's intermediate (FFN) size.")
]
StepTokensOpt = Annotated[
    int | None,
    typer.Option("--tokens-per-step", help="Time model: tokens of one step over all GPUs (default 4096 per GPU)."),
]


def load_graph_and_routes(
    tr: Trace, prompts: str, train_fraction: float, split_seed: int, need_routes: bool, num_folds: int = 0
) -> tuple[object, object]:
    """(RoutingGraph, RouteArrays | None) of the chosen prompts of an opened trace."""
    from placement.graph import build_graph, graph_from_routes
    from placement.trace.schema import TraceError, split_by_prompt

    if prompts not in ("all", "train", "test"):
        raise TraceError(f"--prompts {prompts!r}: use all, train or test")
    if prompts == "all" and not need_routes:
        with progress() as bar:
            task = bar.add_task("graph", total=tr.num_tokens, rate="")
            g = build_graph(tr, with_coact=False, num_folds=num_folds, on_progress=lambda n: bar.advance(task, n))
        return g, None
    routes = tr.read_all(with_gates=False)
    if prompts != "all":
        mask_T = split_by_prompt(routes.seq_ids_T, train_fraction, split_seed)
        routes = routes.take(mask_T if prompts == "train" else ~mask_T)
    g = graph_from_routes(
        routes.expert_ids_TLK, tr.meta, with_coact=False, seq_ids_T=routes.seq_ids_T, num_folds=max(num_folds, 1)
    )
    return g, routes


def plan_cmd(
    trace: TraceArg,
    gpus: Annotated[int, typer.Option("--gpus", help="Number of GPUs (expert-parallel ranks) G.")],
    out: Annotated[Path, typer.Option("--out", help="Plan JSON to write (atomically; its directory must exist).")],
    nodes: Annotated[int, typer.Option("--nodes", help="Number of nodes N (G divisible by N).")] = 1,
    redundant: Annotated[int, typer.Option("--redundant", help="Redundant slots per layer (replicas).")] = 0,
    balance: Annotated[
        float | None,
        typer.Option(
            "--balance",
            help="Load tolerance eps: GPU load <= (1+eps) * mean. Default: as balanced on unseen prompts as eplb "
            "(forecast from prompt folds), then as co-located as possible; never fails on a valid trace.",
        ),
    ] = None,
    solver: Annotated[
        str,
        typer.Option(
            "--solver",
            help="auto, contiguous, round_robin, eplb, ilp, affinity. eplb keeps DeepSeek's algorithm, which may put "
            "two copies of one expert on one GPU (11 of 208 redundant copies for DeepSeek-V2-Lite, 8 GPUs, "
            "--redundant 8); affinity never does.",
        ),
    ] = "auto",
    time_limit: Annotated[
        float,
        typer.Option(
            "--time-limit",
            help="Time limit in seconds for reading the trace, solving and scoring the plan (the solver gets a "
            "quarter of it at least; affinity uses all it gets; --objective time shares it among its candidates).",
        ),
    ] = 30.0,
    seed: Annotated[int, typer.Option("--seed", help="Solver random seed.")] = 0,
    work: Annotated[
        int,
        typer.Option(
            "--work",
            min=0,
            help="affinity: a fixed work budget per solve (this many annealing moves, one restart) instead of all "
            "the time it gets: the same plan for the same trace and --seed on any machine that finishes it within "
            "--time-limit. 0: use the time.",
        ),
    ] = 0,
    backend: Annotated[str, typer.Option("--ilp-backend", help="ILP backend: cpsat, pulp (CBC) or highs.")] = "cpsat",
    robust: Annotated[
        float, typer.Option("--robust", help="affinity: kappa, std-devs of unseen-prompt load kept within --balance.")
    ] = 0.0,
    unseen: Annotated[
        bool,
        typer.Option(
            "--unseen",
            help="affinity: apply --balance to the forecast median imbalance on unseen prompts (searches --robust; "
            "without --balance the default already plans for unseen prompts).",
        ),
    ] = False,
    inter_node_cost: Annotated[float, typer.Option("--inter-node-cost", help="Cost of a cross-node pair.")] = 4.0,
    objective: Annotated[
        str,
        typer.Option(
            "--objective",
            help="colocation (default: the most co-located plan at the balance) or time: the candidate plan "
            "(contiguous, eplb, affinity default, affinity at several balances) of the lowest predicted step time "
            "on unseen prompts (docs/metrics.md).",
        ),
    ] = "colocation",
    hardware: HardwareOpt = None,
    hf_config: HfConfigOpt = None,
    hidden_size: HiddenOpt = None,
    expert_ffn_size: FfnOpt = None,
    tokens_per_step: StepTokensOpt = None,
    prompts: SplitOpt = "all",
    train_fraction: FractionOpt = 0.5,
    split_seed: SplitSeedOpt = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
    ray: RayOpt = False,
    address: AddressOpt = None,
    workers: WorkersOpt = 2,
) -> None:
    """Solve expert placement for a trace and write the plan JSON.

    The summary line reports cost: the trace's token steps from an expert of one MoE layer to an expert of the
    next on another GPU (x1 within a node, x --inter-node-cost across nodes; lower is better), and gap: how far
    cost may still be above the best possible, as a share of cost (0 = proven optimal; for heuristics the gap
    to a lower bound). The forecast line gives the expected imbalance_max on prompts the trace does not hold.
    With --objective time it also prints every candidate's predicted time per layer (mean / max) and per step.
    """
    from placement.cli import MAIN_STARTED

    # --time-limit counts the command's imports (from the console script) and reading the trace too
    started = MAIN_STARTED[0] if MAIN_STARTED else time.perf_counter()
    from placement.graph import PROMPT_FOLDS
    from placement.plan import PlanError
    from placement.planner import SOLVER_NAMES, make_plan
    from placement.solvers.affinity import work_budget
    from placement.solvers.base import PlanSpec

    with user_errors():
        if solver not in SOLVER_NAMES:
            raise PlanError(f"unknown --solver {solver!r}; choose one of {', '.join(SOLVER_NAMES)}")
        if unseen and solver not in ("auto", "affinity"):
            raise PlanError(f"--unseen works with --solver affinity (or auto), not {solver!r}")
        if objective not in ("colocation", "time"):
            raise UserError(f"--objective {objective!r}: use colocation or time")
        timed = {"--hardware": hardware, "--hf-config": hf_config, "--hidden-size": hidden_size}
        timed |= {"--expert-ffn-size": expert_ffn_size, "--tokens-per-step": tokens_per_step}
        stray = [k for k, v in timed.items() if v is not None]
        if objective != "time" and stray:
            raise UserError(f"{stray[0]} is an option of the time model; add --objective time")
        if objective == "time" and (balance is not None or unseen or robust):
            raise UserError("--objective time chooses the balance itself; drop --balance, --unseen and --robust")
        spec = PlanSpec(
            num_gpus=gpus,
            num_nodes=nodes,
            num_redundant=redundant,
            balance_eps=0.1 if balance is None else balance,
            auto_balance=balance is None,
            time_limit=time_limit,
            seed=seed,
            inter_node_cost=inter_node_cost,
            options={"ilp_backend": backend, "kappa": robust, "unseen": unseen, **work_budget(work)},
        )
        from placement.trace.dataset import open_trace

        tr = open_trace(trace)
        spec.validate(tr.meta.num_experts)
        if objective == "time":
            from placement.timemodel import check_topology, load_hardware, resolve_dims

            hw = load_hardware(hardware or "h100-nvlink-ib400")
            check_topology(gpus, nodes, hw)
            dims = resolve_dims(tr.meta, hf_config, hidden_size, expert_ffn_size, tokens_per_step)
            timing = {"objective": "time", "hardware": hw.to_json(), "model_dims": dims.to_json()}
            spec = replace(spec, options={**spec.options, **timing})
        check_output(out, force=force)  # before the solve, not after it
        # prompt-fold loads feed the robust balance and the unseen-imbalance forecast
        if ray and prompts != "all":
            raise UserError(f"--ray counts every prompt of the trace; drop --prompts {prompts} or --ray")
        if ray:
            g = ray_graph(tr, False, address, workers, num_folds=PROMPT_FOLDS)
        else:
            g, _ = load_graph_and_routes(tr, prompts, train_fraction, split_seed, False, num_folds=PROMPT_FOLDS)
        plan = make_plan(g, spec, solver, started=started)
        plan.save(out)
    pv = plan.provenance
    gap = "unknown" if pv["gap"] is None else f"{pv['gap']:.1%}"
    typer.echo(
        f"wrote {out}: solver={pv['solver']} status={pv['status']} G={gpus} N={nodes} P={plan.num_slots} "
        f"time={pv['solve_seconds']:.2f}s cost={pv['topology_cost']:.0f} gap={gap} "
        "(cost: token steps between layers that change GPU, lower is better; gap: how far cost may be above "
        "the optimum)"
    )
    fc = pv.get("unseen_imbalance")
    if fc:
        typer.echo(
            f"On new prompts (as many tokens as this trace), the busiest GPU should carry about {fc['p50']:.2f}x "
            f"the mean load (80% of the time between {fc['p10']:.2f}x and {fc['p90']:.2f}x; "
            f"imbalance_max, bootstrapped over {fc['folds']} prompt folds)."
        )
    info = pv.get("info") or {}
    if info.get("objective") == "time":
        typer.echo(
            f"Predicted time per step of {info['tokens_per_step']:,} tokens on {info['hardware']} "
            f"(unseen prompts; per layer mean / max, step total; chose {info['time_choice']}):"
        )
        for row in info["time"]:
            typer.echo(
                f"  {row['name']:<24} {row['layer_mean_s'] * 1e3:8.3f} / {row['layer_max_s'] * 1e3:8.3f} ms per layer"
                f"  {row['step_s'] * 1e3:9.3f} ms per step (compute {row['compute_s'] * 1e3:.3f}, "
                f"all-to-all {row['comm_s'] * 1e3:.3f})"
            )
        for row in info.get("time_skipped", []):  # one --time-limit covers every candidate
            typer.echo(f"  {row['name']:<24} not compared: {row['why']}")
        if "time_bound_s" in info:
            typer.echo(
                f"  bound for any plan: {info['time_bound_s'] * 1e3:.3f} ms per step (compute at perfect balance, "
                f"no all-to-all): no plan is more than {info['time_gap']:.1%} faster than the chosen one"
            )
    if info.get("balance"):  # the default balance (no --balance): what it aimed for and what it chose
        aim = info.get("eplb_forecast")
        typer.echo(
            f"Default balance ({info['balance']}): "
            + (
                f"planned for a forecast of at most {info['unseen_target']:.3f} on new prompts (eplb's forecast "
                f"{aim:.3f}, less {aim - info['unseen_target']:.2f} for the optimism of searched forecasts); "
                if aim is not None
                else "no prompt ids to forecast with, so eplb's balance on this trace; "
            )
            + f"eplb's imbalance_max on this trace is {info['eplb_fit_imbalance']:.3f}. Pass --balance to choose "
            "another trade."
        )


def eval_cmd(
    plan: Annotated[Path, typer.Option("--plan", help="Plan JSON written by `moeplace plan`.")],
    trace: TraceArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print all metrics as JSON.")] = False,
    hidden: Annotated[
        int | None,
        typer.Option("--hidden", help="Hidden size of a token (for bytes). Default 4096; with --hardware the model's."),
    ] = None,
    dtype_bytes: Annotated[int, typer.Option("--dtype-bytes", help="Bytes per element (2 = bf16).")] = 2,
    intra_bw: Annotated[float, typer.Option("--intra-bw", help="Intra-node bytes/s per GPU.")] = 450e9,
    inter_bw: Annotated[float, typer.Option("--inter-bw", help="Inter-node bytes/s per GPU.")] = 50e9,
    hardware: Annotated[
        str | None,
        typer.Option(
            "--hardware",
            help="Also predict the step time (docs/metrics.md) on this preset (h100-nvlink-ib400, h200-nvlink-ib400) "
            "or HardwarePreset JSON file.",
        ),
    ] = None,
    hf_config: HfConfigOpt = None,
    expert_ffn_size: FfnOpt = None,
    tokens_per_step: StepTokensOpt = None,
    prompts: SplitOpt = "all",
    train_fraction: FractionOpt = 0.5,
    split_seed: SplitSeedOpt = 0,
) -> None:
    """Evaluate a plan on a trace: colocation, imbalance, all-to-all bytes and simulated time (home / follow)."""
    from placement.metrics import Topology, evaluate
    from placement.plan import Plan

    with user_errors():
        p = Plan.load(plan)
        from placement.trace.dataset import open_trace

        tr = open_trace(trace)
        p.check_trace(tr.meta, where=str(plan))
        dims = None
        if hardware is not None:
            from placement.timemodel import check_topology, load_hardware, predict_time, resolve_dims

            hw = load_hardware(hardware)
            check_topology(p.num_gpus, p.num_nodes, hw)
            dims = resolve_dims(tr.meta, hf_config, hidden, expert_ffn_size, tokens_per_step)
            dims = replace(dims, bytes_per_element=dtype_bytes)
        elif hf_config is not None or expert_ffn_size is not None or tokens_per_step is not None:
            raise UserError(
                "--hf-config, --expert-ffn-size and --tokens-per-step are time model options; add --hardware"
            )
        g, routes = load_graph_and_routes(tr, prompts, train_fraction, split_seed, need_routes=True)
        token_bytes = (hidden or (dims.hidden_size if dims else 4096)) * dtype_bytes
        topo = Topology(intra_node_bw=intra_bw, inter_node_bw=inter_bw, token_bytes=token_bytes)
        res = evaluate(p, g, routes, topo)  # type: ignore[arg-type]
        if dims is not None:
            st = predict_time(p, g, hw, dims)  # type: ignore[arg-type]
            res["predicted_time"] = {
                **st.summary(),
                "layer_s": st.layer_L.tolist(),
                "hardware": hw.name,
                "tokens_per_step": dims.step_tokens(p.num_gpus),
                "hidden_size": dims.hidden_size,
                "expert_ffn_size": dims.expert_ffn_size,
            }
    if as_json:
        echo_json(res)
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{plan} on {trace} ({res['num_tokens']:,} tokens)")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("colocation", f"{res['colocation']:.4f}")
    t.add_row("imbalance_max", f"{res['imbalance_max']:.4f}")
    t.add_row("imbalance_mean", f"{res['imbalance_mean']:.4f}")
    for mode in ("home", "follow"):
        m = res[mode]
        t.add_row(f"{mode}: bytes/token", f"{m['bytes_per_token']:,.0f}")
        t.add_row(f"{mode}: inter-node share", f"{m['bytes_inter_node'] / max(1, m['bytes_total']):.3f}")
        t.add_row(f"{mode}: all-to-all s (sum of layers)", f"{m['alltoall_seconds_total']:.6f}")
    if "predicted_time" in res:
        pt = res["predicted_time"]
        t.add_row(
            f"predicted ms per layer, mean / max ({pt['hardware']}, {pt['tokens_per_step']:,} tokens per step)",
            f"{pt['layer_mean_s'] * 1e3:.3f} / {pt['layer_max_s'] * 1e3:.3f}",
        )
        t.add_row("predicted ms per step (compute + all-to-all)", f"{pt['step_s'] * 1e3:.3f}")
    Console().print(t)


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_cmd)  # help: the docstring (it explains the summary line's cost and gap)
    app.command("eval", help="Evaluate a plan on a trace (METRICS.md metrics, traffic, simulated all-to-all).")(
        eval_cmd
    )
