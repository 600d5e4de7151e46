"""Context parallelism: layout helpers in-process; attention, logits and gradients against one
process in real gloo worlds (2 ranks; 4 ranks with cp=4 and with two interleaved cp=2 groups).
Training through the real Trainer under cp, cp x FSDP and cp x TP is compared with one process
in tests/test_parallel_numerics.py (and cp x PP in tests/test_pipeline.py)."""

from __future__ import annotations

import copy
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from titan.config.errors import ConfigError
from titan.models.llama3 import CausalAttention, Llama3, LlamaArgs
from titan.parallel.context_parallel import (
    ALLGATHER_KERNELS,
    ContextParallelAttention,
    allgather_attention,
    apply_cp,
    cp_chunks,
    cp_inputs,
    cp_positions,
    cp_shard,
    cp_unshard,
    validate_cp,
)
from titan.parallel.cp_kernels import KERNELS, prefix_attention
from titan.parallel.ring_attention import _pairs, ring_attention
from titan.train.launch import free_port

SEQ, BATCH = 32, 2
MODES = ("allgather", "ring")


# ---------------------------------------------------------------------------------------------
# Layout (in-process)
# ---------------------------------------------------------------------------------------------


def test_positions_follow_mirrored_chunks():
    assert cp_positions(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert cp_positions(8, 1, 2).tolist() == [2, 3, 4, 5]
    assert cp_positions(8, 0, 1).tolist() == list(range(8))
    for cp in (2, 4):
        every = torch.cat([cp_positions(32, r, cp) for r in range(cp)])
        assert sorted(every.tolist()) == list(range(32))


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_shard_matches_positions_and_unshard_inverts(cp):
    tokens = torch.arange(3 * 32).view(3, 32)
    shards = [cp_shard(tokens, 1, r, cp) for r in range(cp)]
    for r, shard in enumerate(shards):
        assert torch.equal(shard, tokens[:, cp_positions(32, r, cp)])
    assert torch.equal(cp_unshard(shards, 1), tokens)
    x = torch.randn(2, 3, 32, 4)  # (batch, heads, seq, head_dim)
    assert torch.equal(cp_unshard([cp_shard(x, 2, r, cp) for r in range(cp)], 2), x)


def test_cp_inputs():
    tokens, labels = torch.randint(0, 9, (2, 16)), torch.randint(0, 9, (2, 16))
    t, l, pos = cp_inputs(tokens, labels, 1, 2)
    assert torch.equal(t, tokens[:, pos]) and torch.equal(l, labels[:, pos])
    assert cp_inputs(tokens, labels, 0, 1) == (tokens, labels, None)


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_causal_work_is_balanced(cp):
    seq = 64 * cp
    # Query at position p attends to p + 1 keys.
    work = [int((cp_positions(seq, r, cp) + 1).sum()) for r in range(cp)]
    assert max(work) - min(work) <= sum(work) / cp / cp
    contiguous = [int((torch.arange(r * seq // cp, (r + 1) * seq // cp) + 1).sum()) for r in range(cp)]
    assert max(contiguous) > 2 * min(contiguous)  # what the mirrored layout avoids
    # Ring: every rank computes the same amount (causal pairs count half) at every step.
    for step in range(cp):
        per_rank = {sum(0.5 if causal else 1.0 for *_, causal in _pairs(r, (r - step) % cp, cp)) for r in range(cp)}
        assert len(per_rank) == 1


def test_validate_cp():
    validate_cp(32, 2)
    validate_cp(7, 1)  # no CP, no constraint
    with pytest.raises(ConfigError) as err:
        validate_cp(36, 4)
    assert err.value.key == "training.seq_len" and "multiple of 8" in str(err.value)
    with pytest.raises(ConfigError):
        validate_cp(32, 0)
    with pytest.raises(ValueError):
        cp_shard(torch.zeros(1, 10), 1, 0, 2)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_ring_kernels_match_sdpa_single_rank(kernel):
    """Each ring kernel's forward, backward and the log-sum-exp merge, without communication
    (cp=1: the back chunk merges a full and a diagonal pair), in fp64."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 8, 16, dtype=torch.float64, generator=g, requires_grad=True) for h in (4, 2, 2))
    out = ring_attention(q, k, v, None, 0, 1, kernel)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("cp", [2, 4])
def test_prefix_attention_matches_sdpa(kernel, cp):
    """allgather mode's local compute: each rank's chunks against the whole K/V, in fp64."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 16, 8, dtype=torch.float64, generator=g, requires_grad=True) for h in (4, 2, 2))
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    outs, dqs, dk, dv = [], [], 0, 0
    for r in range(cp):  # every rank's share, one after the other
        q_local = cp_shard(q.detach(), 2, r, cp).requires_grad_()
        kv = [x.detach().requires_grad_() for x in (k, v)]
        out = prefix_attention(q_local, *kv, cp_chunks(r, cp), kernel)
        grads = torch.autograd.grad(out, (q_local, *kv), cp_shard(grad, 2, r, cp))
        outs.append(out.detach())
        dqs.append(grads[0])
        dk, dv = dk + grads[1], dv + grads[2]
    torch.testing.assert_close(cp_unshard(outs, 2), ref.detach(), rtol=1e-12, atol=1e-12)
    for a, b in zip((cp_unshard(dqs, 2), dk, dv), ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_apply_cp_swaps_sdpa_only():
    model = _tiny_model()
    names = {n for n, _ in model.named_parameters()}
    assert apply_cp(model, None, 0, 1) is model
    assert isinstance(model.layers["0"].attention.sdpa, CausalAttention)
    apply_cp(model, None, 0, 2, mode="ring")
    for block in model.layers.values():
        assert isinstance(block.attention.sdpa, ContextParallelAttention)
        assert block.attention.sdpa.kv_repeats == 2 and block.attention.sdpa.mode == "ring"
    assert {n for n, _ in model.named_parameters()} == names
    with pytest.raises(ConfigError):
        ContextParallelAttention(None, 0, 2, mode="flash")


# ---------------------------------------------------------------------------------------------
# Exactness in real gloo worlds
# ---------------------------------------------------------------------------------------------


def _tiny_model() -> Llama3:
    args = LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=SEQ)
    model = Llama3(args)
    model.init_weights(seed=0)
    return model


def _batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, 128, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _ce(logits, labels, reduction="mean"):
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction=reduction)


def _check_cp(group, cp_rank: int, cp_size: int, mode: str) -> None:
    ref = _tiny_model()
    model = apply_cp(copy.deepcopy(ref), group, cp_rank, cp_size, mode)
    tokens, labels = _batch(0)
    tok, lab, pos = cp_inputs(tokens, labels, cp_rank, cp_size)

    # (a) logits, gathered back to global order.
    ref_logits = ref(tokens)
    logits = model(tok, positions=pos)
    shards = [torch.empty_like(logits) for _ in range(cp_size)]
    dist.all_gather(shards, logits.detach().contiguous(), group=group)
    torch.testing.assert_close(cp_unshard(shards, 1), ref_logits.detach(), rtol=1e-5, atol=1e-5)

    # (b) this rank's share of the global mean loss; summed over ranks: the loss and gradients.
    ref_loss = _ce(ref_logits, labels)
    ref_loss.backward()
    loss = _ce(logits, lab, "sum") / labels.numel()
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    torch.testing.assert_close(total, ref_loss.detach(), rtol=1e-5, atol=0)
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        dist.all_reduce(p.grad, group=group)
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{mode} {name}: {m}")


def _check_attention_kernels(group, cp_rank: int, cp_size: int) -> None:
    """Attention alone, every mode and kernel: sharded outputs and q/k/v gradients equal
    causal SDPA's on the whole sequence."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, SEQ, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    grad = torch.randn(2, 4, SEQ, 8, generator=g)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    runs = [(ring_attention, kernel) for kernel in KERNELS] + [(allgather_attention, kernel) for kernel in ALLGATHER_KERNELS]
    for attention, kernel in runs:
        local = [cp_shard(x.detach(), 2, cp_rank, cp_size).requires_grad_() for x in (q, k, v)]
        out = attention(*local, group, cp_rank, cp_size, kernel)
        grads = torch.autograd.grad(out, local, cp_shard(grad, 2, cp_rank, cp_size))
        for mine, full in zip((out, *grads), (ref, *ref_grads)):
            shards = [torch.empty_like(mine) for _ in range(cp_size)]
            dist.all_gather(shards, mine.detach().contiguous(), group=group)
            torch.testing.assert_close(cp_unshard(shards, 2), full.detach(), rtol=1e-5, atol=1e-5, msg=lambda m, a=attention, k=kernel: f"{a.__name__} {k}: {m}")


def _worker(rank: int, world: int, port: int, layouts: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        if "whole" in layouts:  # cp over the whole world
            _check_attention_kernels(dist.group.WORLD, rank, world)
            for mode in MODES:
                _check_cp(dist.group.WORLD, rank, world, mode)
        if "interleaved" in layouts:  # cp=2 groups {0, 2} and {1, 3}: group ranks != global ranks
            group, _ = dist.new_subgroups_by_enumeration([[0, 2], [1, 3]])
            _check_attention_kernels(group, dist.get_rank(group), 2)
            for mode in MODES:
                _check_cp(group, dist.get_rank(group), 2, mode)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world,layouts", [(2, "whole"), (4, "whole+interleaved")])
def test_cp_matches_single_process(world, layouts):
    mp.spawn(_worker, args=(world, free_port(), layouts), nprocs=world, join=True)
