"""The memory and scale planner (titan/plan.py, python -m titan.tools.plan).

Fast: shapes come from meta models and nothing big is allocated, except one tiny measured step
(a subprocess) and one real block on CPU whose saved tensors are counted."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from titan.models import build_model, count_params, model_args
from titan.models.llama3 import LlamaArgs, TransformerBlock, rope_table
from titan.plan import Layout, block_saved_bytes, plan, resolve_degrees
from titan.tools.plan import compose, format_plan, split_argv

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


@functools.lru_cache(maxsize=None)
def cfg(*overrides: str):
    """Composed once per override set (Hydra composition is the slow part); plan() does not
    modify its config."""
    return compose(list(overrides))


def static_bytes(m) -> float:
    return m.params + m.grads + m.optim_states


# --------------------------------------------------------------------------------------------
# parameters and sharding
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["llama3_tiny", "llama3_debug", "llama3_1b", "llama3_8b", "llama3_70b"])
def test_param_count_matches_meta_model(preset):
    c = cfg(f"model={preset}")
    p = plan(c)
    vocab = c.model.vocab_size if c.model.vocab_size > 0 else c.tokenizer.vocab_size
    assert p.n_params == count_params(build_model(model_args(c.model, vocab, c.training.seq_len)))
    # One rank, no sharding: the rank holds every parameter once (tied ones too).
    assert p.worst.params == p.n_params * 4


def test_8b_fsdp_on_8_ranks_is_16_bytes_per_param_over_8():
    p = plan(cfg("model=llama3_8b", "parallel=fsdp"), world_size=8)
    assert p.n_params == pytest.approx(8.03e9, rel=1e-3)
    assert static_bytes(p.worst) == pytest.approx(p.n_params * (4 + 4 + 8) / 8, rel=1e-4)


def test_doubling_dp_shard_halves_params_grads_and_optimizer_states():
    a = plan(cfg("model=llama3_8b", "parallel=fsdp"), world_size=8).worst
    b = plan(cfg("model=llama3_8b", "parallel=fsdp"), world_size=16).worst
    for field in ("params", "grads", "optim_states"):
        assert getattr(b, field) == pytest.approx(getattr(a, field) / 2, rel=1e-4)


def test_tp2_halves_the_matmul_params_but_not_the_norms():
    c1 = cfg("model=llama3_8b")
    c2 = cfg("model=llama3_8b", "parallel.tp=2", "parallel.dp_shard=1")
    one, two = plan(c1).worst, plan(c2, world_size=2).worst
    dim, layers = c1.model.dim, c1.model.n_layers
    norms = (2 * layers + 1) * dim  # replicated under TP
    assert (two.params / 4 - norms) == pytest.approx((one.params / 4 - norms) / 2, rel=1e-9)


def test_pp_splits_layers_and_puts_embedding_and_output_on_the_ends():
    p = plan(cfg("model=llama3_8b", "parallel.pp=4", "parallel.dp_shard=1"), world_size=4)
    assert [r.layers for r in p.ranks] == [8, 8, 8, 8]
    assert [r.has_embedding for r in p.ranks] == [True, False, False, False]
    assert [r.has_output for r in p.ranks] == [False, False, False, True]
    assert sum(r.params for r in p.ranks) == p.n_params * 4  # every parameter exactly once
    # 1F1B: the first stage holds pp micro-batches, the last one.
    assert [r.in_flight for r in p.ranks] == [4, 3, 2, 1]
    # ZB-V: a V of 2 chunks per rank, so rank 0 holds the first and the last stage.
    v = plan(cfg("model=llama3_8b", "parallel.pp=4", "parallel.dp_shard=1", "parallel.pp_schedule=ZBVZeroBubble"), world_size=4)
    assert v.ranks[0].has_embedding and v.ranks[0].has_output
    gpipe = plan(cfg("model=llama3_8b", "parallel.pp=4", "parallel.dp_shard=1", "parallel.pp_schedule=GPipe", "parallel.pp_microbatches=8"), world_size=4)
    assert all(r.in_flight == 8 for r in gpipe.ranks)


def test_degrees_resolve_like_the_training_mesh():
    from titan.parallel.mesh import resolve_degrees as mesh_resolve

    for overrides, world in [((), 8), (("parallel.tp=2",), 8), (("parallel.pp=2", "parallel.cp=2"), 16), (("parallel=hsdp",), 4)]:
        c = cfg(*overrides)
        assert resolve_degrees(c, world) == mesh_resolve(c.parallel, world)


# --------------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------------
def _saved_by_autograd(args: LlamaArgs, batch: int, seq: int, dtype: torch.dtype) -> int:
    """Bytes of the distinct storages one real block saves for backward (params excluded)."""
    block = TransformerBlock(0, args).to(dtype)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    rope = rope_table(args)[:seq]
    x = torch.randn(batch, seq, args.dim, dtype=dtype, requires_grad=True)
    skip = {p.untyped_storage().data_ptr() for p in block.parameters()} | {rope.untyped_storage().data_ptr()}
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, rope)
    return sum(saved.values())


@pytest.mark.parametrize("kv_heads,dtype", [(None, torch.float32), (2, torch.float32), (2, torch.bfloat16)])
def test_block_saved_tensors_match_autograd_on_cpu(kv_heads, dtype):
    args = LlamaArgs(dim=64, n_heads=4, n_kv_heads=kv_heads, multiple_of=32, max_seq_len=32)
    layout = Layout(1, 1, 1, 1, 1, fsdp=False, sequence_parallel=False, loss_parallel=False)
    act = 2 if dtype is torch.bfloat16 else 4
    estimate = sum(block_saved_bytes(args, 2 * 32, act, layout, cpu=True).values())
    assert estimate == _saved_by_autograd(args, 2, 32, dtype)


def test_activation_checkpointing_lowers_activation_memory():
    base = ["model=llama3_8b", "parallel=fsdp", "precision=bf16", "training.seq_len=8192", "training.micro_batch_size=1"]
    acts = {mode: plan(cfg(*base, f"activation_checkpoint={mode}"), world_size=8).worst.activations for mode in ("none", "selective_layer", "selective_op", "full")}
    assert acts["full"] < acts["selective_op"] < acts["none"]
    assert acts["full"] < acts["selective_layer"] < acts["none"]
    assert acts["full"] < acts["none"] / 10


def test_tp_divides_activations_except_the_gathered_matmul_inputs():
    base = ["model=llama3_8b", "precision=bf16", "training.seq_len=8192", "training.micro_batch_size=1", "parallel.dp_shard=1"]
    one = plan(cfg(*base)).per_layer_activation
    tp = plan(cfg(*base, "parallel.tp=4"), world_size=4).per_layer_activation
    assert one / 4 < tp < one / 2  # the gathered matmul inputs stay full length under TP+SP


def test_cp_keeps_kv_heads_gathered_or_local():
    args = LlamaArgs(dim=4096, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3)
    local, cp, kv_width = 2048, 4, 8 * 128

    def saved(cp_degree, mode="allgather"):
        layout = Layout(1, 1, cp_degree, 1, 1, fsdp=cp_degree > 1, sequence_parallel=False, loss_parallel=False, cp_mode=mode)
        return block_saved_bytes(args, local, 2, layout, cpu=False)

    plain, gathered, ring = saved(1), saved(cp), saved(cp, "ring")
    assert plain["k, v"] == 2 * local * 4096 * 2  # repeated to n_heads
    assert gathered["k, v"] == 2 * local * cp * kv_width * 2  # one copy per kv head, whole sequence
    assert ring["k, v"] == 2 * local * kv_width * 2  # only the local block
    assert {k: v for k, v in gathered.items() if k != "k, v"} == {k: v for k, v in plain.items() if k != "k, v"}


# --------------------------------------------------------------------------------------------
# verdict, communication, FLOPs
# --------------------------------------------------------------------------------------------
def test_published_layouts():
    # Llama 3 8B trains with FSDP on 8 x 80 GB GPUs (bf16, AC), as torchtitan publishes.
    ok = plan(cfg("model=llama3_8b", "parallel=fsdp", "precision=bf16", "activation_checkpoint=full", "training.seq_len=8192", "training.micro_batch_size=1"), world_size=8)
    assert ok.fits
    # 70B on 8 GPUs: 16 bytes/param of state alone is ~141 GB per rank.
    big = plan(cfg("model=llama3_70b", "parallel=fsdp", "precision=bf16", "activation_checkpoint=full", "training.micro_batch_size=1"), world_size=8)
    assert not big.fits and static_bytes(big.worst) > 130e9


def test_communication_volumes():
    p = plan(cfg("model=llama3_8b", "parallel=fsdp", "precision=bf16", "training.global_batch_size=8", "training.micro_batch_size=1"), world_size=8)
    rs = p.communication["dp_shard x cp: FSDP reduce-scatter"]
    assert rs == pytest.approx(p.n_params * 4 * 7 / 8, rel=1e-3)  # fp32 gradients, once
    assert not any(k.startswith(("tp", "pp", "cp", "dp_replicate")) for k in p.communication)
    h = plan(cfg("model=llama3_8b", "parallel=hsdp", "parallel.tp=2", "training.global_batch_size=8", "training.micro_batch_size=1"), world_size=8)
    assert {"dp_replicate: gradient all-reduce", "tp: activation gathers / reduce-scatters"} <= set(h.communication)


def test_flops_and_step_time():
    p = plan(cfg("model=llama3_8b", "parallel=fsdp", "training.seq_len=8192", "training.global_batch_size=8", "training.micro_batch_size=1"), world_size=8, peak_tflops=1000, mfu=0.5)
    assert p.flops_per_step == pytest.approx(p.flops_per_token * 8 * 8192)
    assert p.step_time_s == pytest.approx(p.flops_per_step / (8 * 1000e12 * 0.5))
    assert p.tokens_per_s == pytest.approx(8 * 8192 / p.step_time_s)


def test_argv_split_and_table():
    options, overrides, as_json = split_argv(["model=llama3_8b", "world_size=8", "device_memory_gib=40", "--json", "parallel.tp=2"])
    assert options == {"world_size": 8, "device_memory_gib": 40.0}
    assert overrides == ["model=llama3_8b", "parallel.tp=2"] and as_json
    text = format_plan(plan(cfg("model=llama3_debug")))
    assert "verdict: FITS" in text and "PEAK" in text


def test_cli_exits_3_when_it_does_not_fit():
    args = [sys.executable, "-m", "titan.tools.plan", "model=llama3_70b", "parallel=fsdp", "world_size=8", "device_memory_gib=80", "--json"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr
    out = json.loads(proc.stdout)
    assert out["fits"] is False and out["worst"]["peak"] > out["usable_memory"]
    assert next(iter(out["worst"]["consumers"])) == "optimizer states"


# --------------------------------------------------------------------------------------------
# against a measured step
# --------------------------------------------------------------------------------------------
def test_estimate_within_25_percent_of_a_measured_cpu_step():
    overrides = ["training.device=cpu", "training.seq_len=128", "training.micro_batch_size=4", "training.global_batch_size=4"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    bench = REPO / "benchmarks" / "plan_vs_measured.py"
    proc = subprocess.run([sys.executable, str(bench), "--worker", json.dumps(overrides)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["increment"]
    estimate = plan(cfg(*overrides)).worst.peak
    assert abs(estimate / measured - 1) < 0.25, (estimate, measured)
