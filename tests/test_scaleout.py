"""bench/scaleout.py: the analytic ZeRO memory and communication model on hand-checked cases and against the memory
bench/zero_memory.py measured; one test runs the trainer's DeepSpeed engine on 2 CPU ranks (torchrun, small model,
ZeRO-2 and ZeRO-3 with 2 micro-steps) and compares the bytes its collectives carry with the formula."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "bench") not in sys.path:  # bench/ scripts import their siblings (`from common import ...`)
    sys.path.insert(0, str(ROOT / "bench"))

import scaleout as so  # noqa: E402

# a model with two parameter groups (weights, biases) and parameters on both sides of ZeRO-3's persistence
# threshold (1e5): 300 000 + 1000 + 50 000 + 7 = 351 007 elements
TOY = so.ModelSizes("toy", params=(300_000, 1000, 50_000, 7), groups=(350_000, 1007))
PSI = TOY.total


def test_ring_costs():
    assert so.ring_bytes("all_reduce", 1000, 1) == 0  # one rank talks to nobody
    assert so.ring_bytes("all_reduce", 1000, 2) == 1000  # 2(N-1)/N
    assert so.ring_bytes("all_reduce", 1000, 4) == 1500
    assert so.ring_bytes("all_gather_into_tensor", 1000, 4) == 750  # (N-1)/N of the gathered tensor
    assert so.ring_bytes("reduce_scatter_tensor", 1000, 4) == 750  # (N-1)/N of the input
    assert so.ring_bytes("broadcast", 1000, 4) == 1000


@pytest.mark.parametrize("zero", so.ZEROS)
@pytest.mark.parametrize("acc", [1, 2, 8])
def test_one_gpu_communicates_nothing(zero, acc):
    assert so.comm_total(TOY, zero, 1, acc) == 0


def test_communication_per_stage_by_hand():
    b = 2  # bf16 gradients: the project sets no communication_data_type
    assert all(so.comm_dtype_bytes(z) == b for z in so.ZEROS)
    # ZeRO-0: one gradient all-reduce per step, whatever the accumulation
    assert so.comm_bytes(TOY, 0, 4, 1) == {"all_reduce": 1.5 * b * PSI}
    assert so.comm_bytes(TOY, 0, 4, 8) == so.comm_bytes(TOY, 0, 4, 1)
    # ZeRO-1: all-reduce at the boundary (reduce_scatter: true all-reduces buckets: use_multi_rank_bucket_allreduce)
    # + all-gather of the bf16 flat groups, each padded to 2N elements: 350 000 -> 350 000, 1007 -> 1008 on N = 4
    padded = 350_000 + 1008
    assert so.zero12_padded(TOY, 4) == padded
    z1 = so.comm_bytes(TOY, 1, 4, 1)
    assert z1 == {"all_reduce": 1.5 * b * PSI, "all_gather_into_tensor": 0.75 * 2 * padded}
    assert so.comm_bytes(TOY, 1, 4, 8) == z1  # reduced once, at the boundary
    # ZeRO-2: equal to ZeRO-1 without accumulation; with A micro-steps the all-reduce runs A times
    assert so.comm_bytes(TOY, 2, 4, 1) == z1
    z2 = so.comm_bytes(TOY, 2, 4, 8)
    assert z2["all_reduce"] == 8 * z1["all_reduce"] and z2["all_gather_into_tensor"] == z1["all_gather_into_tensor"]
    # ZeRO-1/2 move 1.5x ZeRO-0's bytes (not the ZeRO paper's 1x) as N grows
    assert so.comm_total(TOY, 1, 64, 1) / so.comm_total(TOY, 0, 64, 1) == pytest.approx(1.5, rel=1e-2)
    # ZeRO-3 on N = 4: partitions ceil(p / 4) per parameter; 300 000 is gathered (above 1e5), the rest persists
    gathered, persistent = 4 * 75_000, 4 * (250 + 12_500 + 2)
    assert so.zero3_partition(TOY, 4, "gathered") * 4 == gathered
    assert so.zero3_partition(TOY, 4, "persistent") * 4 == persistent
    for acc in (1, 2):  # per micro-step one gather (held from forward to backward) and one reduce-scatter
        assert so.comm_bytes(TOY, 3, 4, acc) == {
            "all_gather_into_tensor": 0.75 * (acc * 2 * gathered + 2 * persistent),
            "reduce_scatter_tensor": acc * 0.75 * b * (gathered + persistent)}
    # GradCache (a contrastive model under accumulation): three gathers per micro-step
    clip = so.ModelSizes("toy", TOY.params, TOY.groups, contrastive=True)
    assert so.comm_bytes(clip, 3, 4, 2)["all_gather_into_tensor"] == 0.75 * (2 * 3 * 2 * gathered + 2 * persistent)
    assert so.comm_bytes(clip, 3, 4, 1) == so.comm_bytes(TOY, 3, 4, 1)


def test_memory_per_stage_by_hand():
    n = 4
    assert so.state_bytes(TOY, 0, n) == {"params": 2 * PSI, "grads": 2 * PSI, "master": 4 * PSI,
                                         "moments": 8 * PSI + 4 * 4, "total": 16 * PSI + 16}
    part = (350_000 + 1008) // n
    z1, z2 = so.state_bytes(TOY, 1, n), so.state_bytes(TOY, 2, n)
    assert z1["grads"] == 2 * PSI and z2["grads"] == 2 * part  # ZeRO-2 partitions the gradients
    assert z1["master"] == z2["master"] == 4 * part and z1["moments"] == 8 * part + 2 * 4
    z3 = so.state_bytes(TOY, 3, n)
    assert z3["params"] == z3["grads"] == 2 * (75_000 + 250 + 12_500 + 2)
    # the ZeRO paper's 16 bytes per parameter without ZeRO, ~16/N with ZeRO-3
    assert so.state_bytes(TOY, 0, 1)["total"] / PSI == pytest.approx(16, rel=1e-4)
    assert so.state_bytes(TOY, 3, 64)["total"] / PSI == pytest.approx(16 / 64, rel=1e-2)


def test_memory_matches_zero_memory_measurement():
    """Exact to the byte: the params, fp32 master and Adam moments bench/zero_memory.py counted on 2 and 4 ranks
    (live tensors after the backward, paper-size models) against `state_bytes` from the meta-device models."""
    res = json.loads((ROOT / "bench/results/zero_memory_cpu.json").read_text())
    cases = [c for c in res["cases"] if "error" not in c]
    assert {c["world_size"] for c in cases} == {2, 4} and {c["zero"] for c in cases} == set(so.ZEROS)
    for c in cases:
        sizes = so.model_sizes(c["config"])
        assert sizes.total == c["params"]
        want = so.state_bytes(sizes, c["zero"], c["world_size"])
        for r in c["ranks"]:
            got = r["after_backward"]
            assert (got["params"], got["master"], got["optim_state"]) == (
                want["params"], want["master"], want["moments"]), (c["config"], c["world_size"], c["zero"])


def test_paper_sizes_and_recommendation():
    s1, s2 = so.model_sizes("vita_stage1"), so.model_sizes("vita_stage2")
    assert (s1.total, s2.total) == (102_680_720, 102_151_756)
    assert not s1.contrastive and s2.contrastive
    assert so.zero3_gathers(s1, 8) == 1  # 2Ψ ~ 2e8 < stage3_max_reuse_distance 1e9
    rec = {r["gpus"]: r for r in (so.recommend("vita_stage1", n) for n in (1, 8, 16, 64))}
    assert [(rec[n]["micro_batch"], rec[n]["accumulation"]) for n in (1, 8, 16, 64)] == [(32, 8), (32, 1), (16, 1),
                                                                                           (4, 1)]
    assert all(r["zero"] == 2 for r in rec.values()) and rec[1]["comm_gb"] == 0
    assert math.isclose(rec[8]["comm_gb"], so.comm_total(s1, 2, 8, 1) / 1e9)


def test_measured_bytes_match_formula_on_two_cpu_ranks(tmp_path):
    """The trainer's engine (bench/common.py `stage_engine`, bf16) on 2 gloo ranks, small Stage I (width 256), one
    warm-up and one measured optimizer step of 2 micro-steps each under ZeRO-2 and ZeRO-3: the bytes of every
    collective (wrapped torch.distributed; DeepSpeed's comms logger beside it) within 0.1 % of `comm_bytes` (the
    rest: gradient-norm scalars). Every rank is gone afterwards (on a timeout `launch` kills them by pid)."""
    import psutil

    pids = tmp_path / "pids"
    res = so.measure(2, "vita_stage1", "small", [(2, 2), (3, 2)], steps=1, warmup=1, micro=2, timeout=150, pids=pids)
    ranks = [int(f.read_text()) for f in pids.glob("rank*")]
    assert len(ranks) == 2
    assert not [p for p in ranks if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    z2, z3 = res["cases"]
    assert (z2["zero"], z2["accumulation"], z3["zero"], z3["accumulation"]) == (2, 2, 3, 2)
    assert z2["optimizer"] == "DeepSpeedZeroOptimizer" and z3["optimizer"] == "DeepSpeedZeroOptimizer_Stage3"
    assert z2["communication_data_type"] == z3["communication_data_type"] == "bfloat16"
    for c in (z2, z3):
        assert abs(c["rel_diff"]) < 1e-3, c
        assert c["rank_spread"] == 0
        assert c["measured_logger"] == pytest.approx(c["measured_deepspeed"], rel=1e-9)  # the logger saw them all
        for op, want in c["analytic_by_op"].items():
            assert c["measured_by_op"][op] == pytest.approx(want, rel=1e-3), op
    # ZeRO-2 all-reduced the gradients in both micro-steps, ZeRO-3 gathered once per micro-step
    sizes = so.model_sizes("vita_stage1", tuple(so.SMALL["vita_stage1"]))
    assert z2["measured_by_op"]["all_reduce"] == pytest.approx(2 * 2 * sizes.total, rel=1e-3)  # A x 2(N-1)/N x 2Ψ
    assert z3["measured"] < z2["measured"]  # with accumulation ZeRO-3 moves fewer bytes than ZeRO-2 here
