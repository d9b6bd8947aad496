"""``moeplace profile``: trace the routing of a model over prompts into a dataset (thin shell over the API).

Wire into the main app with ``profiler.cli.register(app)``. Heavy imports (torch, the model) happen
inside the command, so building the CLI stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress, ProgressColumn, Task
from rich.text import Text

__all__ = ["register"]


class _TokensPerSecond(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- tok/s" if speed is None else f"{speed:,.0f} tok/s", style="progress.data.speed")


def _fail(message: str) -> typer.Exit:
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(1)


def profile(
    model: Annotated[str, typer.Option(help="'builtin', 'hf:<dir>' or 'hf-config:<name>'.")] = "builtin",
    prompts: Annotated[str, typer.Option(help="'builtin', a text file (one prompt per line) or .jsonl.")] = "builtin",
    out: Annotated[
        Path, typer.Option(help="Trace dataset directory (created or resumed; its parent directory must exist).")
    ] = Path("trace"),
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per forward pass.")] = 8,
    max_len: Annotated[int, typer.Option(min=1, help="Tokens per prompt kept (longer prompts are cut).")] = 256,
    limit: Annotated[int | None, typer.Option(min=1, help="Use only the first N prompts.")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads (default: torch's choice).")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Run as a Ray job (see docs/ray.md).")] = False,
    address: Annotated[
        str | None, typer.Option(help="With --ray: head host:port or 'auto' (default: RAY_ADDRESS or local Ray).")
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="With --ray: number of workers.")] = 2,
    mode: Annotated[
        str, typer.Option(help="With --ray: 'data' (a model per worker) or 'expert' (experts sharded).")
    ] = "data",
) -> None:
    """Trace the expert routing of MODEL over PROMPTS into the dataset OUT; resumes where it stopped."""
    from placement.trace.outputs import OutputError, check_output, os_error_line

    try:
        check_output(out, kind="dataset")  # before loading a model or starting Ray
    except OutputError as exc:
        raise _fail(str(exc)) from None
    if ray:
        from ray_jobs.driver import JobConfig
        from ray_jobs.profile import run_cli

        cfg = JobConfig(
            out=out,
            model=model,
            prompts=prompts,
            limit=limit,
            workers=workers,
            mode=mode,
            address=address,
            batch_size=batch_size,
            max_len=max_len,
            threads=threads or 1,
        )
        code = run_cli(cfg)
        if code:
            raise typer.Exit(code)
        return
    from placement.trace.dataset import TraceWriter
    from placement.trace.schema import TraceError
    from profiler.api import ProfileError, completed_prompt_ids, load_model, load_prompts, profile_prompts
    from profiler.capture import CaptureError

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        texts = load_prompts(prompts)
        if limit is not None:
            texts = texts[:limit]
        loaded = load_model(model)
        # Opening the writer first refuses an --out that holds another model's trace.
        writer = TraceWriter(out, loaded.trace_meta(), max_rows_buffered=200_000)
        done = completed_prompt_ids(out)
        todo = [i for i in range(len(texts)) if i not in done]
        if not todo:
            print(f"all {len(texts)} prompts already traced in {out}", file=sys.stderr)
            return
        cap = max_len if loaded.max_positions is None else min(max_len, loaded.max_positions)
        expected = sum(min(len(loaded.tokenizer(texts[i])), cap) for i in todo)
        skipped = f" (skipping {len(texts) - len(todo)} already traced)" if done else ""
        print(f"profiling {len(todo)} prompts, {expected:,} tokens{skipped} -> {out}", file=sys.stderr)
        with (
            writer,
            Progress(*Progress.get_default_columns(), _TokensPerSecond(), transient=False) as bar,
        ):
            task = bar.add_task("tokens", total=expected)
            n = profile_prompts(
                loaded,
                [texts[i] for i in todo],
                todo,
                writer,
                batch_size=batch_size,
                max_len=max_len,
                on_progress=lambda k: bar.advance(task, k),
            )
    except (ProfileError, TraceError, CaptureError) as exc:
        raise _fail(str(exc)) from exc
    except OSError as exc:  # a full disk, a directory made read-only meanwhile
        raise _fail(os_error_line(exc)) from None
    print(f"traced {n:,} tokens x {len(loaded.layers)} MoE layers into {out}", file=sys.stderr)


def register(app: typer.Typer) -> None:
    """Add the ``profile`` command to ``app``."""
    app.command("profile")(profile)
