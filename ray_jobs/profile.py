"""Entry point of a Ray profiling job: ``python -m ray_jobs.profile --out DIR [options]``.

Runs as the entrypoint of ``ray job submit --working-dir . -- python -m ray_jobs.profile --out /abs/dir ...``
(it then joins the job's cluster through ``RAY_ADDRESS``), or directly (embedded local Ray unless
``--address``), or through ``moeplace profile --ray``. Prints one progress line per finished shard and one
``error: ...`` line on failure (exit 1).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ray_jobs.driver import MODES, JobConfig, JobProgress, JobResult, RayJobError, run_job

__all__ = ["main", "run_cli"]


def _progress(p: JobProgress) -> None:
    print(
        f"shards {p.shards_done}/{p.shards_total}  {p.tokens:,} tokens  {p.tokens_per_s:,.0f} tok/s",
        file=sys.stderr,
        flush=True,
    )


def _pids(pids: list[int]) -> None:
    print(f"worker pids: {' '.join(map(str, pids))}", file=sys.stderr, flush=True)


def run_cli(cfg: JobConfig) -> int:
    """Run ``cfg``, print progress and a summary (or one error line); returns the exit code."""
    from placement.trace.outputs import OutputError, os_error_line
    from placement.trace.schema import TraceError
    from profiler.api import ProfileError
    from profiler.capture import CaptureError
    from ray_jobs.shards import ShardError

    where = cfg.address or os.environ.get("RAY_ADDRESS") or "local Ray"
    print(f"profiling on {where} with {cfg.workers} {cfg.mode}-parallel workers -> {cfg.out}", file=sys.stderr)
    try:
        res: JobResult = run_job(cfg, on_progress=_progress, on_pids=_pids)
    except (RayJobError, ShardError, ProfileError, TraceError, CaptureError, OutputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk, a directory made read-only meanwhile
        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        return 1
    skipped = res.shards_total - res.shards_run
    note = f" ({skipped} shards already done)" if skipped else ""
    print(
        f"traced {res.tokens:,} tokens in {res.shards_run} shards{note}, {res.tokens_per_s:,.0f} tok/s, "
        f"start-up {res.startup_s:.1f} s; dataset {res.out} holds {res.rows:,} rows",
        file=sys.stderr,
    )
    return 0


def parser() -> argparse.ArgumentParser:
    d = JobConfig(out=Path("trace"))
    ap = argparse.ArgumentParser(prog="python -m ray_jobs.profile", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="trace dataset directory (created or resumed)")
    ap.add_argument("--model", default=d.model, help="'builtin', 'hf:<dir>' or 'hf-config:<name>'")
    ap.add_argument("--prompts", default=d.prompts, help="'builtin', a text file or .jsonl")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    ap.add_argument("--workers", type=int, default=d.workers, help="Ray workers (ranks in expert mode)")
    ap.add_argument("--mode", choices=MODES, default=d.mode, help="data: model per worker; expert: experts sharded")
    ap.add_argument("--address", default=None, help="Ray head host:port or 'auto' (default: RAY_ADDRESS or local)")
    ap.add_argument(
        "--shard-size",
        type=int,
        default=d.shard_size,
        help="prompts per shard (default: --batch-size, x workers in expert mode)",
    )
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="prompts per forward pass")
    ap.add_argument("--max-len", type=int, default=d.max_len, help="tokens kept per prompt")
    ap.add_argument("--cpus-per-worker", type=float, default=d.cpus_per_worker, help="CPUs reserved per worker")
    ap.add_argument("--threads", type=int, default=d.threads, help="torch threads per worker")
    ap.add_argument("--num-cpus", type=int, default=d.num_cpus, help="CPUs of the embedded local Ray")
    ap.add_argument("--max-restarts", type=int, default=d.max_restarts, help="restarts per worker / task retries")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    cfg = JobConfig(
        out=a.out,
        model=a.model,
        prompts=a.prompts,
        limit=a.limit,
        workers=a.workers,
        mode=a.mode,
        address=a.address,
        shard_size=a.shard_size,
        batch_size=a.batch_size,
        max_len=a.max_len,
        cpus_per_worker=a.cpus_per_worker,
        threads=a.threads,
        num_cpus=a.num_cpus,
        max_restarts=a.max_restarts,
    )
    return run_cli(cfg)


if __name__ == "__main__":
    sys.exit(main())
