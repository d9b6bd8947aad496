"""``moeplace serve``: parse options, start placement.serve's service and its HTTP API under uvicorn."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from placement.cli.common import UserError, user_errors

__all__ = ["register"]


def _token(token: str | None, token_file: Path | None, state: Path) -> str:
    """The bearer token: --token, --token-file, $MOEPLACE_TOKEN, or one generated into STATE_DIR/token."""
    from placement.serve.state import ensure_token

    if token and token_file:
        raise UserError("pass --token or --token-file, not both")
    if token_file is not None:
        if not token_file.is_file():
            raise UserError(f"--token-file {token_file}: no such file")
        text = token_file.read_text().strip()
        if not text:
            raise UserError(f"--token-file {token_file}: the file is empty; write the token into it")
        return text
    if token:
        return token
    generated, path = ensure_token(state)
    typer.echo(f"bearer token for POST requests: in {path}", err=True)
    return generated


def serve_cmd(
    plan: Annotated[Path, typer.Option("--plan", help="Initial plan JSON (version 1 of a new --state).")],
    state: Annotated[Path, typer.Option("--state", help="State directory: plan versions, ledger, checkpoint.")],
    watch: Annotated[
        Path | None, typer.Option("--watch", help="Parquet trace dataset to ingest new shards from (part-*.parquet).")
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind; only this machine by default.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port.")] = 8470,
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="MOEPLACE_TOKEN", help="Bearer token for POSTs (prefer --token-file)."),
    ] = None,
    token_file: Annotated[Path | None, typer.Option("--token-file", help="File holding the bearer token.")] = None,
    half_life: Annotated[
        float,
        typer.Option(
            "--half-life",
            min=0,
            help="Tokens after which old routing weighs half (0: no decay; docs/service.md on choosing it).",
        ),
    ] = 25_000,
    long_half_life: Annotated[
        float,
        typer.Option(
            "--long-half-life",
            min=0,
            help="The second memory the policy may plan on: tokens after which it weighs old routing half (0: all "
            "traffic so far; else longer than --half-life).",
        ),
    ] = 0,
    one_memory: Annotated[
        bool, typer.Option("--one-memory", help="Plan on the --half-life window alone (no second memory).")
    ] = False,
    max_moves: Annotated[
        int | None, typer.Option("--max-moves", min=0, help="Expert copies allowed per decision (default: policy's).")
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="How a decision re-plans: 'step' (a local step from the deployed plan; plans with redundant slots "
            "re-plan with the target) or 'target' (the affinity target mixed in under the forecast budget).",
        ),
    ] = "step",
    expert_bytes: Annotated[
        int, typer.Option("--expert-bytes", min=0, help="Bytes of one expert's weights (for bytes moved).")
    ] = 0,
    hf_config: Annotated[
        Path | None,
        typer.Option("--hf-config", help="Hugging Face model dir or config.json giving the expert size instead."),
    ] = None,
    interval: Annotated[
        float, typer.Option("--interval", min=0, help="Seconds between automatic decisions (0: only POST /v1/replan).")
    ] = 300,
    poll: Annotated[float, typer.Option("--poll", min=0.05, help="Seconds between scans of --watch.")] = 1.0,
    time_limit: Annotated[float, typer.Option("--time-limit", min=0.1, help="Solver seconds per decision.")] = 10.0,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", min=0.001, help="Request body size limit (MiB).")] = 64,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")] = "info",
    ray: Annotated[
        bool, typer.Option("--ray", help="Count new shards of --watch as Ray tasks (docs/ray.md); same counts.")
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address", help="With --ray: Ray head host:port or 'auto' (default: RAY_ADDRESS or a local Ray)."
        ),
    ] = None,
    ray_cpus: Annotated[int, typer.Option("--ray-cpus", min=1, help="With --ray: CPUs of the embedded local Ray.")] = 2,
    ray_workers: Annotated[
        int, typer.Option("--ray-workers", min=1, help="With --ray: shard-counting tasks running at once.")
    ] = 2,
    ray_serve: Annotated[
        bool,
        typer.Option(
            "--ray-serve",
            help="Run the same API as a Ray Serve application (one replica; Ray Serve's proxy binds --host/--port; "
            "the cluster: --ray-address or an embedded local Ray of --ray-cpus CPUs).",
        ),
    ] = False,
) -> None:
    """Serve plans over HTTP, follow live routing and re-plan with few expert moves (docs/service.md).

    Ingests new shards of --watch and POST /v1/observations into a decayed routing window, decides every
    --interval seconds (or on POST /v1/replan) whether re-planning pays for its moves, and keeps every plan
    version with its move list in --state. SIGTERM or Ctrl-C stops it after the shard in progress.
    """
    import functools
    import logging
    from dataclasses import replace

    import uvicorn

    from placement.plan import Plan
    from placement.serve.app import create_app
    from placement.serve.service import ReplanService, ServiceConfig
    from placement.trace.outputs import check_output
    from ray_jobs.driver import RayJobError

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with user_errors():
        if log_level.lower() not in ("debug", "info", "warning", "error"):
            raise UserError(f"--log-level {log_level!r}: use debug, info, warning or error")
        if watch is not None and watch.exists() and not watch.is_dir():
            raise UserError(f"--watch {watch}: not a directory; pass the dataset directory")
        if not ray and ray_workers != 2:
            raise UserError("--ray-workers needs --ray")
        if not (ray or ray_serve) and (ray_address is not None or ray_cpus != 2):
            raise UserError("--ray-address and --ray-cpus need --ray or --ray-serve")
        if ray and watch is None:
            raise UserError("--ray counts the shards of --watch; pass --watch DATASET or drop --ray")
        if expert_bytes and hf_config is not None:
            raise UserError("--expert-bytes and --hf-config both give the expert size; pass one of them")
        if hf_config is not None:
            from placement.replan.moves import expert_bytes_from_hf_config

            expert_bytes = expert_bytes_from_hf_config(hf_config)
        initial = Plan.load(plan)
        cfg = ServiceConfig(state, watch, half_life, max_moves, expert_bytes, interval, poll, time_limit,
                            long_half_life=long_half_life, one_memory=one_memory, method=method)  # fmt: skip
        cfg = replace(cfg, ray=ray, ray_address=ray_address, ray_cpus=ray_cpus, ray_workers=ray_workers, warm_up=True)
        check_output(state, kind="dataset", flag="--state")  # a state directory: created (parent must exist) or resumed
        secret = _token(token, token_file, state)
        if ray_serve:
            from placement.serve.rayserve import run
            from placement.serve.state import StateStore

            probe = StateStore(state)  # a --state in use fails here, in one line, not inside the replica
            probe.open()
            probe.close()

            try:
                limit = int(max_body_mb * (1 << 20))
                echo = functools.partial(typer.echo, err=True)
                run(plan, cfg, secret, max_body=limit, host=host, port=port, address=ray_address, num_cpus=ray_cpus,
                    on_ready=echo)  # fmt: skip
            except RayJobError as exc:
                raise UserError(str(exc)) from None
            return
        service = ReplanService(initial, cfg)
        try:
            service.start()
        except RayJobError as exc:
            raise UserError(str(exc)) from None
    try:
        app = create_app(service, secret, max_body=int(max_body_mb * (1 << 20)))
        uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), timeout_graceful_shutdown=30)
    finally:
        service.stop()  # the app stops it on shutdown; this covers a server that never started (port in use)


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command to ``app``."""
    app.command("serve")(serve_cmd)
