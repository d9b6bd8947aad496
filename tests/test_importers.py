"""Importers: npz of the real traces, faithful SGLang and Megatron samples, loads-only sources."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from placement.trace.dataset import open_trace
from placement.trace.importers import import_trace
from placement.trace.importers.popularity import read_loads
from placement.trace.schema import TraceError
from tests.conftest import SHARED_SPECS, listing

# ------------------------------------------------------------------------------------------------- npz


@pytest.mark.parametrize(("spec", "T", "K"), SHARED_SPECS)
def test_npz_import_round_trip(traces_dir, tmp_path, spec, T, K):
    rows = import_trace(str(traces_dir / spec), "npz", tmp_path / "ds")
    src = open_trace(traces_dir / spec)
    got = open_trace(tmp_path / "ds")
    assert rows == T * src.meta.num_layers and got.meta == src.meta
    a, b = src.read_all(), got.read_all()
    np.testing.assert_array_equal(a.expert_ids_TLK, b.expert_ids_TLK)
    np.testing.assert_array_equal(a.seq_ids_T, b.seq_ids_T)
    if a.gate_weights_TLK is not None:  # flame has gate scores
        np.testing.assert_array_equal(a.gate_weights_TLK, b.gate_weights_TLK)


def test_npz_without_routes(tmp_path):
    np.savez(tmp_path / "x.npz", other=np.zeros((2, 2, 2)))
    with pytest.raises(TraceError, match=r"x\.npz: no array 'routes'"):
        import_trace(str(tmp_path / "x.npz"), "npz", tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_npy_top1(tmp_path):
    np.save(tmp_path / "r.npy", np.array([[0, 1], [1, 1], [2, 0]]))
    assert import_trace(str(tmp_path / "r.npy"), "npy", tmp_path / "ds", num_experts=4) == 6
    t = open_trace(tmp_path / "ds")
    assert (t.meta.top_k, t.meta.num_experts) == (1, 4)


# ---------------------------------------------------------------------------------------------- sglang
# Faithful to sglang/srt/eplb/expert_distribution.py: _DetailAccumulator.dump / _StatAccumulator.dump.

A, P, SLOT_K = 4, 10, 8  # model layers (layer 0 dense), physical slots, recorder columns
PHY2LOG = torch.tensor([[p % 8 for p in range(P)]] * A)  # 8 logical experts, slots 8, 9 replicate 0, 1
PHY2LOG[2] = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0, 7, 0])


def _detail_record(pass_id: int, phys_TLK: np.ndarray, positions: list[int], seq_lens: list[int] | None):
    """One per_token record: topk_ids_of_layer [L_all, T, 8] int32, -1 outside written region."""
    T = phys_TLK.shape[0]
    topk = torch.full((A, T, SLOT_K), -1, dtype=torch.int32)
    topk[1:, :, : phys_TLK.shape[2]] = torch.from_numpy(phys_TLK.transpose(1, 0, 2).astype(np.int32))
    return dict(
        forward_pass_id=pass_id,
        rank=0,
        gatherer_key="primary",
        input_ids=list(range(100, 100 + T)),
        positions=positions,
        extend_seq_lens=seq_lens,
        forward_mode=1 if seq_lens else 2,
        topk_ids_of_layer=topk,
        misc_objects=[],
        global_physical_count=torch.zeros(A, P, dtype=torch.int32),
    )


def _sglang_dump(path, rng):
    phys1 = rng.integers(0, P, size=(5, A - 1, 3))  # prefill: 2 sequences of 3 and 2 tokens, top-3
    phys2 = rng.integers(0, P, size=(2, A - 1, 3))  # decode: 2 sequences, one token each
    phys2[0, 1, 2] = -1  # a slot SGLang left unwritten
    recs = [
        _detail_record(0, phys1, [0, 1, 2, 0, 1], [3, 2]),
        _detail_record(1, phys2, [3, 2], None),
    ]
    torch.save({"records": recs, "last_physical_to_logical_map": PHY2LOG}, path)
    return np.concatenate([phys1, phys2])


def test_sglang_per_token(tmp_path):
    rng = np.random.default_rng(0)
    phys_TLK = _sglang_dump(tmp_path / "expert_distribution_recorder_1.0_0.pt", rng)
    rows = import_trace(str(tmp_path / "expert_distribution_recorder_1.0_0.pt"), "sglang", tmp_path / "ds")
    t = open_trace(tmp_path / "ds")
    assert rows == 7 * 3
    assert t.meta.layers == (1, 2, 3) and t.meta.top_k == 3 and t.meta.num_experts == 8
    p2l = PHY2LOG.numpy()
    want = np.where(phys_TLK >= 0, p2l[np.arange(1, A)[None, :, None], np.maximum(phys_TLK, 0)], -1)
    r = t.read_all()
    np.testing.assert_array_equal(r.expert_ids_TLK, want)
    np.testing.assert_array_equal(r.token_pos_T, [0, 1, 2, 0, 1, 3, 2])
    np.testing.assert_array_equal(r.seq_ids_T, [0, 0, 0, 1, 1, 2, 3])


def test_sglang_directory_and_moe_layers(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "dumps").mkdir()
    _sglang_dump(tmp_path / "dumps" / "a_0.pt", rng)
    _sglang_dump(tmp_path / "dumps" / "a_1.pt", rng)
    import_trace(str(tmp_path / "dumps"), "sglang", tmp_path / "ds", moe_layers=[2, 3], num_experts=16)
    t = open_trace(tmp_path / "ds")
    assert t.meta.layers == (2, 3) and t.meta.num_experts == 16 and t.num_tokens == 14


def test_sglang_stat_is_loads_only(tmp_path):
    count = torch.zeros(3, A, 8, dtype=torch.int32)
    count[:, 1:] = torch.randint(0, 50, (3, A - 1, 8), dtype=torch.int32)
    torch.save({"rank": 0, "logical_count": count, "average_utilization_rate_over_window": None}, tmp_path / "s.pt")
    with pytest.raises(TraceError, match=r"per-expert loads only.*--loads-only"):
        import_trace(str(tmp_path / "s.pt"), "sglang", tmp_path / "ds")
    assert not (tmp_path / "ds").exists()
    assert import_trace(str(tmp_path / "s.pt"), "sglang", tmp_path / "loads.json", loads_only=True) == 3
    lt = read_loads(tmp_path / "loads.json")
    assert lt.layers == (1, 2, 3)
    np.testing.assert_array_equal(lt.load_LE, count.sum(0)[1:].numpy())


def test_sglang_per_pass_maps_physical_counts(tmp_path):
    c = torch.zeros(A, P, dtype=torch.int32)
    c[1, 0], c[1, 8], c[2, 9] = 3, 2, 5  # slot 8 of layer 1 is expert 0; slot 9 of layer 2 is expert 0
    rec = dict(forward_pass_id=0, rank=0, gatherer_key="primary", global_physical_count=c)
    torch.save({"records": [rec], "last_physical_to_logical_map": PHY2LOG}, tmp_path / "p.pt")
    import_trace(str(tmp_path / "p.pt"), "sglang", tmp_path / "l.json", loads_only=True)
    lt = read_loads(tmp_path / "l.json")
    assert lt.layers == (1, 2) and lt.load_LE[0, 0] == 5 and lt.load_LE[1, 0] == 5 and lt.load_LE.sum() == 10


def test_sglang_unknown_version(tmp_path):
    torch.save({"dump_format": 9, "topk": torch.zeros(2, 2)}, tmp_path / "new.pt")
    with pytest.raises(TraceError, match=r"new\.pt: unknown SGLang dump layout \(keys: dump_format, topk\)"):
        import_trace(str(tmp_path / "new.pt"), "sglang", tmp_path / "ds")
    torch.save(
        {"records": [{"forward_pass_id": 0, "ids": [1]}], "last_physical_to_logical_map": PHY2LOG},
        tmp_path / "r.pt",
    )
    with pytest.raises(TraceError, match=r"unknown SGLang dump version"):
        import_trace(str(tmp_path / "r.pt"), "sglang", tmp_path / "ds")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(TraceError, match=r"not a readable torch\.save file"):
        import_trace(str(tmp_path / "junk.pt"), "sglang", tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


# -------------------------------------------------------------------------------------------- megatron


def _mega_rec(step, layer, ids, rank=0, **extra):
    ids = np.asarray(ids)
    rec = {"step": step, "stage": "pre_dispatch", "block": "decoder", "layer": layer, "rank": rank}
    rec |= {"num_tokens": len(ids), "topk": ids.shape[1], "top_indices": ids.tolist(), **extra}
    return json.dumps(rec)


def _mega_files(d, rng):
    """Two ranks, two steps; step 1 of rank 0 has two micro-batches; one MTP record to skip."""
    want = []
    for rank in (0, 1):
        lines = []
        for step in (0, 1):
            for mb in range(2 if (rank, step) == (0, 1) else 1):
                ids = rng.integers(0, 16, size=(4, 3, 2))  # [T, L, K], layers 1..3
                want.append((rank, step, mb, ids))
                lines += [_mega_rec(step, layer, ids[:, i], rank) for i, layer in enumerate((1, 2, 3))]
            lines.append(
                json.dumps(
                    {
                        "step": step,
                        "block": "mtp",
                        "mtp_idx": 0,
                        "layer": 1,
                        "topk": 2,
                        "top_indices": [[0, 1]],
                        "rank": rank,
                        "num_tokens": 1,
                    }
                )
            )
        (d / f"router_trace_rank{rank}.jsonl").write_text("\n".join(lines) + "\n")
    return want


def test_megatron_merge_ranks(tmp_path):
    want = _mega_files(tmp_path, np.random.default_rng(0))
    rows = import_trace(str(tmp_path), "megatron", tmp_path / "ds", num_experts=16)
    t = open_trace(tmp_path / "ds")
    assert t.meta.layers == (1, 2, 3) and t.meta.top_k == 2 and rows == 20 * 3
    r = t.read_all()
    np.testing.assert_array_equal(r.expert_ids_TLK, np.concatenate([w[3] for w in want]))
    # (rank, step) groups are sequences: rank0 step0, rank0 step1 (2 micro-batches), rank1 step0, rank1 step1
    np.testing.assert_array_equal(r.seq_ids_T, np.repeat([0, 1, 2, 3], [4, 8, 4, 4]))


def test_megatron_bad_inputs(tmp_path):
    f = tmp_path / "router_trace_rank0.jsonl"
    f.write_text(_mega_rec(0, 1, [[1, 2], [3, 4]]) + "\n" + _mega_rec(0, 2, [[1, 2]]) + "\n")
    with pytest.raises(TraceError, match="step 0: layer 2 routed 1 tokens but layer 1 routed 2"):
        import_trace(str(f), "megatron", tmp_path / "ds")
    f.write_text(_mega_rec(0, 1, [[1, 2]]) + "\n" + _mega_rec(0, 2, [[1, 2, 3]]) + "\n")
    with pytest.raises(TraceError, match=r"mixed top-k \[2, 3\]"):
        import_trace(str(f), "megatron", tmp_path / "ds")
    f.write_text(_mega_rec(0, 1, [[1, 2]]) + "\n" + '{"step": 0, "layer": 2, "topk"')
    with pytest.raises(TraceError, match=r"rank0\.jsonl:2: not a JSON record"):
        import_trace(str(f), "megatron", tmp_path / "ds")
    f.write_text(json.dumps({"iteration": 0, "experts": [[1]]}) + "\n")
    with pytest.raises(TraceError, match="not a Megatron-Core router trace"):
        import_trace(str(f), "megatron", tmp_path / "ds")
    f.write_text(_mega_rec(0, 1, [[1, 9]]) + "\n")
    with pytest.raises(TraceError, match="expert id 9 >= num_experts=4"):
        import_trace(str(f), "megatron", tmp_path / "ds", num_experts=4)
    assert listing(tmp_path) == ["router_trace_rank0.jsonl"]


# ------------------------------------------------------------------------------------------ popularity


def test_popularity_json(traces_dir, tmp_path):
    src = traces_dir / "mixtral-8x7b-popularity" / "instruct_expert_popularity_machine_learning.json"
    raw = json.loads(src.read_text())
    assert import_trace(str(src), "popularity", tmp_path / "l.json", loads_only=True) == 32
    lt = read_loads(tmp_path / "l.json")
    np.testing.assert_array_equal(lt.load_LE, raw["expert_popularity"])
    assert lt.num_tokens == raw["total_input_tokens"]
