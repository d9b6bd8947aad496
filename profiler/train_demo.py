"""Train the shipped demo MoE on the Python standard library's own source, offline.

    python -m profiler.train_demo --out profiler/assets

The corpus is every ``.py`` file under ``sysconfig.get_paths()['stdlib']`` (no site-packages, no
test suites), split deterministically by a CRC32 of the relative path: one file in ten is held out
and only used to cut the builtin prompts (``builtin_prompts.jsonl``). Training is seeded and uses a
Switch-style load-balancing loss so every expert gets traffic.

Also defines :func:`transition_concentration`, the learned-routing check: for each expert at MoE
layer l, the share of its traffic that goes to its top-m experts at layer l+1, compared with the
same share if the two layers routed independently (product of marginals).

Dimension key:
    T  tokens
    L  MoE layers
    K  experts chosen per token (top-k)
    E  experts per layer
    B  batch, S sequence length
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "Concentration",
    "build_prompts",
    "stdlib_files",
    "train",
    "transition_concentration",
]

HELD_OUT_MOD = 10  # crc32(relpath) % HELD_OUT_MOD == 0 -> held-out file
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def stdlib_files(held_out: bool) -> list[tuple[str, Path]]:
    """``(relative path, path)`` of stdlib ``.py`` files in the training or held-out split, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if EXCLUDED_DIRS.intersection(path.relative_to(root).parts):
            continue
        if (zlib.crc32(rel.encode()) % HELD_OUT_MOD == 0) == held_out:
            out.append((rel, path))
    return out


def _read_corpus(files: list[tuple[str, Path]]) -> np.ndarray:
    chunks = [p.read_bytes() for _, p in files]
    return np.frombuffer(b"\n\n".join(chunks), dtype=np.uint8)


def build_prompts(n_prompts: int = 320, min_chars: int = 160, max_chars: int = 480) -> list[dict[str, str]]:
    """Cut deterministic code snippets from held-out stdlib files, each starting at a def/class line."""
    prompts: list[dict[str, str]] = []
    files = stdlib_files(held_out=True)
    per_file = max(1, math.ceil(n_prompts / max(1, len(files))))
    for rel, path in files:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            continue
        starts = [i for i, ln in enumerate(lines) if ln.lstrip().startswith(("def ", "class "))]
        # Spread the picks over the file instead of taking the first few.
        picks = starts[:: max(1, len(starts) // per_file)][:per_file] if starts else []
        for i in picks:
            text = ""
            for ln in lines[i:]:
                if len(text) + len(ln) + 1 > max_chars:
                    break
                text += ln + "\n"
            if len(text) >= min_chars and text.isascii():
                prompts.append({"text": text, "source": rel})
        if len(prompts) >= n_prompts:
            break
    return prompts[:n_prompts]


@dataclass(frozen=True)
class Concentration:
    """Adjacent-layer transition concentration, traffic-weighted over experts and layer pairs."""

    learned: float  # share of an expert's next-layer traffic going to its top-m next experts
    independent: float  # the same share under independent layers (product of marginals)
    per_layer_pair: tuple[tuple[float, float], ...]  # (learned, independent) for each (l, l+1)

    @property
    def ratio(self) -> float:
        return self.learned / self.independent


def transition_concentration(expert_ids_TLK: np.ndarray, n_experts: int, top_m: int) -> Concentration:
    """Concentration of routing transitions between adjacent MoE layers.

    ``expert_ids_TLK``: int ``[T, L, K]``. Each token contributes K*K (expert at l, expert at l+1)
    pairs. For expert e at layer l with transition row ``C[e, :]``, learned share = top-m of
    ``C[e, :]`` / row sum; independent share = top-m of the layer-(l+1) marginal. Both are weighted
    by the row's traffic.
    """
    ids = np.asarray(expert_ids_TLK, dtype=np.int64)
    if ids.ndim != 3 or ids.shape[1] < 2:
        raise ValueError(f"expert_ids_TLK must be [T, L>=2, K], got shape {ids.shape}")
    _, L, K = ids.shape
    pairs = []
    tot_learned = tot_indep = tot_w = 0.0
    for l in range(L - 1):
        src = np.repeat(ids[:, l, :], K, axis=1).reshape(-1)
        dst = np.tile(ids[:, l + 1, :], (1, K)).reshape(-1)
        C_EE = np.bincount(src * n_experts + dst, minlength=n_experts * n_experts).reshape(n_experts, n_experts)
        rows_E = C_EE.sum(axis=1).astype(np.float64)
        top_E = np.sort(C_EE, axis=1)[:, -top_m:].sum(axis=1)
        marg_E = C_EE.sum(axis=0) / C_EE.sum()
        indep = float(np.sort(marg_E)[-top_m:].sum())
        learned = float(top_E.sum() / rows_E.sum())
        pairs.append((learned, indep))
        w = float(rows_E.sum())
        tot_learned += learned * w
        tot_indep += indep * w
        tot_w += w
    return Concentration(tot_learned / tot_w, tot_indep / tot_w, tuple(pairs))


def train(
    out_dir: Path,
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    aux_coef: float,
    seed: int,
    max_minutes: float,
) -> None:
    import torch

    from profiler.model import DemoMoE, MoEConfig, save_demo_model

    torch.set_num_threads(2)
    torch.manual_seed(seed)
    cfg = MoEConfig(max_seq_len=seq_len)
    model = DemoMoE(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    corpus = torch.from_numpy(_read_corpus(stdlib_files(held_out=False)).astype(np.int64))
    print(f"params={n_params} corpus_bytes={corpus.numel()} cfg={cfg}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))

    gen = torch.Generator().manual_seed(seed)
    offsets_S = torch.arange(seq_len + 1)
    t0 = time.perf_counter()
    model.train()
    loss_avg = aux_avg = float("nan")
    steps_done = 0
    for step in range(steps):
        starts_B = torch.randint(0, corpus.numel() - seq_len - 1, (batch_size,), generator=gen)
        window_BS = corpus[starts_B[:, None] + offsets_S]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(window_BS[:, :-1])
        ce = torch.nn.functional.cross_entropy(out.logits_BSV.reshape(-1, cfg.vocab_size), window_BS[:, 1:].reshape(-1))
        loss = ce + aux_coef * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps_done = step + 1
        loss_avg = ce.item() if math.isnan(loss_avg) else 0.98 * loss_avg + 0.02 * ce.item()
        aux_avg = out.aux_loss.item() if math.isnan(aux_avg) else 0.98 * aux_avg + 0.02 * out.aux_loss.item()
        elapsed = time.perf_counter() - t0
        if step % 50 == 0 or step == steps - 1:
            print(
                f"step {step:5d} ce {loss_avg:.4f} ({loss_avg / math.log(2):.3f} bits/byte) "
                f"aux {aux_avg:.4f} lr {lr_at(step):.2e} {elapsed:.0f}s",
                flush=True,
            )
        if elapsed > max_minutes * 60:
            print(f"stopping at step {step}: time cap {max_minutes} min", flush=True)
            break
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_demo_model(model, out_dir / "demo_moe.safetensors", out_dir / "demo_moe.json", torch.float16)
    prompts = build_prompts()
    with (out_dir / "builtin_prompts.jsonl").open("w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps(p) + "\n")
    record = {
        "seed": seed,
        "steps_planned": steps,
        "steps_done": steps_done,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "lr": lr,
        "aux_coef": aux_coef,
        "final_ce_nats_per_byte": round(loss_avg, 4),
        "final_aux_loss": round(aux_avg, 4),
        "seconds": round(time.perf_counter() - t0),
        "corpus_bytes": int(corpus.numel()),
        "params": n_params,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    (out_dir / "demo_moe.train.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(
        f"saved to {out_dir}: final ce {loss_avg:.4f} nats/byte, {len(prompts)} prompts, "
        f"{time.perf_counter() - t0:.0f}s",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "assets")
    ap.add_argument("--steps", type=int, default=2800)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=14.0)
    a = ap.parse_args(argv)
    train(a.out, a.steps, a.batch_size, a.seq_len, a.lr, a.aux_coef, a.seed, a.max_minutes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
