"""``moeplace import``, ``moeplace stats`` and ``moeplace graph``: thin commands over placement.trace.importers and
placement.graph. A TRACE argument is a Parquet dataset (or shard), an ``.npz`` (``file.npz:ARRAY`` picks an
array), or for ``stats`` also a loads-only JSON file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from placement.cli.common import UserError, echo_json, progress, user_errors
from placement.trace.outputs import check_output

TRACE_HELP = "Trace: a Parquet dataset directory or shard, or FILE.npz[:ARRAY] (default array: routes)."


def _parse_layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UserError(f"--moe-layers {text!r}: give comma-separated layer ids, e.g. 3,4,5") from None


def _open(trace_spec: str, num_experts: int | None) -> Any:
    from placement.trace.dataset import open_trace

    return open_trace(trace_spec, num_experts=num_experts)


def _build_graph(trace: Any, with_coact: bool) -> Any:
    """Stream an opened trace into its routing graph, with a progress bar."""
    from placement.graph import build_graph

    total = trace.num_tokens
    with progress() as bar:
        task = bar.add_task("graph", total=total, rate="")
        return build_graph(trace, with_coact=with_coact, on_progress=lambda n: bar.advance(task, n))


RayOpt = Annotated[
    bool, typer.Option("--ray", help="Build the graph as Ray tasks over the trace's shards (docs/ray.md).")
]
AddressOpt = Annotated[
    str | None, typer.Option(help="With --ray: Ray head host:port or 'auto' (default: RAY_ADDRESS or a local Ray).")
]
WorkersOpt = Annotated[int, typer.Option(min=1, help="With --ray: graph tasks running at once.")]


def ray_graph(trace: Any, with_coact: bool, address: str | None, workers: int, num_folds: int = 0) -> Any:
    """An opened trace's routing graph built as Ray tasks (ray_jobs/graph.py), with a progress bar."""
    from ray_jobs.driver import RayJobError
    from ray_jobs.graph import build_graph_ray

    with progress() as bar:
        task = bar.add_task("graph (Ray)", total=trace.num_tokens, rate="")
        try:
            return build_graph_ray(
                trace,
                address=address,
                num_workers=workers,
                with_coact=with_coact,
                num_folds=num_folds,
                on_progress=lambda n: bar.advance(task, n),
            )
        except RayJobError as exc:
            raise UserError(str(exc)) from None


def _counter() -> Any:
    """A progress display for streams of unknown length (tokens so far); hidden when stderr is no terminal."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}: {task.completed:,.0f} tokens"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


def import_cmd(
    src: Annotated[str, typer.Argument(help="Source: a file, FILE.npz:ARRAY, or a directory of rank dumps.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="Source format: npz, npy, sglang, megatron, popularity.")],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output Parquet dataset directory, created or appended to (a JSON file with --loads-only); "
            "its parent directory must exist.",
        ),
    ],
    num_experts: Annotated[int | None, typer.Option(help="Number of experts E (default: from the source).")] = None,
    model_name: Annotated[str | None, typer.Option(help="Model name stored in the trace metadata.")] = None,
    moe_layers: Annotated[
        str | None,
        typer.Option(help="sglang: comma-separated model layer ids of the MoE layers (default: layers with routing)."),
    ] = None,
    loads_only: Annotated[
        bool,
        typer.Option("--loads-only", help="Write per-layer expert loads as JSON instead of a token dataset."),
    ] = False,
    writer_id: Annotated[
        str, typer.Option(help="Shard name prefix; use distinct ids for parallel imports into one dataset.")
    ] = "import",
    force: Annotated[bool, typer.Option("--force", help="--loads-only: replace an existing JSON file.")] = False,
) -> None:
    """Import a routing trace (npz/npy, SGLang dump, Megatron router trace) into a Parquet trace dataset.

    Nothing is left in --out when the import fails; an --out holding another model's trace is refused.
    """
    from placement.trace.importers import import_trace

    with user_errors(), _counter() as bar:
        check_output(out, force=force, kind="file" if loads_only else "dataset")
        task = bar.add_task("import", total=None)
        n = import_trace(
            src,
            fmt,
            out,
            num_experts=num_experts,
            model_name=model_name,
            moe_layers=_parse_layers(moe_layers),
            loads_only=loads_only,
            writer_id=writer_id,
            on_progress=lambda k: bar.advance(task, k),
        )
    what = "MoE layers of expert loads" if loads_only else "token-layer rows"
    typer.echo(f"wrote {n:,} {what} to {out}", err=True)


def stats_cmd(
    trace: Annotated[str, typer.Argument(help=TRACE_HELP + " Also a loads JSON (moeplace or popularity).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print all statistics as JSON.")] = False,
    top_m: Annotated[
        int | None, typer.Option(help="Top-m next experts for transition concentration (default E/8).")
    ] = None,
    num_experts: Annotated[int | None, typer.Option(help="Number of experts for an .npz without num_experts.")] = None,
    ray: RayOpt = False,
    address: AddressOpt = None,
    workers: WorkersOpt = 2,
) -> None:
    """Routing statistics: per-layer load skew, transition concentration vs. independence, entropy."""
    from placement.graph import graph_stats, load_stats
    from placement.trace.importers.popularity import is_loads_file, read_loads

    with user_errors():
        if top_m is not None and top_m < 1:
            raise UserError(f"--top-m {top_m}: must be >= 1")
        if is_loads_file(trace):
            s = load_stats(read_loads(trace))
        else:
            tr = _open(trace, num_experts)
            g = ray_graph(tr, False, address, workers) if ray else _build_graph(tr, with_coact=False)
            s = graph_stats(g, top_m=top_m)
    if as_json:
        echo_json(s)
    else:
        _print_table(s)


def _print_table(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    loads_only = s.get("loads_only", False)
    title = f"{s['model']}: {s['num_tokens']:,} tokens, {s['num_layers']} MoE layers x {s['num_experts']} experts" + (
        "" if loads_only else f", top-{s['top_k']}"
    )
    t = Table(title=title)
    for col in ("layer", "load skew", "entropy bits"):
        t.add_column(col, justify="right")
    if not loads_only:
        t.add_column(f"top-{s['top_m']} conc. -> next", justify="right")
        t.add_column("independent", justify="right")
        t.add_column("H(next | this)", justify="right")
    L = s["num_layers"]
    for i in range(L):
        row = [str(s["layers"][i]), f"{s['load_skew'][i]:.2f}", f"{s['entropy_bits'][i]:.2f}"]
        if not loads_only:
            has_next = i < L - 1
            row += (
                [
                    f"{s['concentration'][i]:.3f}",
                    f"{s['independent'][i]:.3f}",
                    f"{s['cond_entropy_bits'][i]:.2f}",
                ]
                if has_next
                else ["", "", ""]
            )
        t.add_row(*row)
    console = Console()
    console.print(t)
    sm = s["summary"]
    line = (
        f"load skew max {sm['load_skew_max']:.2f} mean {sm['load_skew_mean']:.2f}; "
        f"entropy {sm['entropy_bits_mean']:.2f} of {sm['max_entropy_bits']:.2f} bits"
    )
    if not loads_only:
        line += f"; concentration {sm['concentration_mean']:.3f} (independent {sm['independent_mean']:.3f})"
    console.print(line)


def graph_cmd(
    trace: Annotated[str, typer.Argument(help=TRACE_HELP)],
    graphml: Annotated[
        Path, typer.Option("--graphml", help="Output GraphML file (written atomically; its directory must exist).")
    ],
    min_weight: Annotated[int, typer.Option(help="Keep only transition edges with at least this count.")] = 1,
    keep_top: Annotated[int | None, typer.Option(help="Keep only each expert's heaviest next-layer partners.")] = None,
    num_experts: Annotated[int | None, typer.Option(help="Number of experts for an .npz without num_experts.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --graphml file.")] = False,
) -> None:
    """Export the routing-dependency graph: nodes (layer, expert) with load, edges l -> l+1 with counts."""
    with user_errors():
        if keep_top is not None and keep_top < 1:
            raise UserError(f"--keep-top {keep_top}: must be >= 1")
        tr = _open(trace, num_experts)  # a bad trace is reported before a bad output
        check_output(graphml, force=force, flag="--graphml")
        g = _build_graph(tr, with_coact=False)
        if keep_top:
            g = g.keep_top_pairs(keep_top)
        g.write_graphml(graphml, min_weight=min_weight)
    typer.echo(f"wrote {graphml}", err=True)


def register(app: typer.Typer) -> None:
    app.command("import")(import_cmd)
    app.command("stats")(stats_cmd)
    app.command("graph")(graph_cmd)
