"""Optimizers, parameter groups, bf16 optimizer states and learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from titan.config.schema import DType, LRScheduleConfig, LRScheduleName, OptimConfig, OptimName, PrecisionConfig
from titan.models.llama3 import Llama3, LlamaArgs, count_params
from titan.optim import BF16StateAdam, BF16StateSGD, build_lr_scheduler, build_optimizer, lr_factor, param_groups
from titan.optim.stochastic_round import copy_stochastic_

ARGS = LlamaArgs(dim=64, n_layers=2, n_heads=4, vocab_size=128, multiple_of=32, max_seq_len=32)
BF16_STATES = PrecisionConfig(name="bf16_optim_states", optim_state_dtype=DType.bfloat16)


def tiny_model(tie: bool = False) -> Llama3:
    torch.manual_seed(0)
    model = Llama3(LlamaArgs(**{**ARGS.__dict__, "tie_embeddings": tie}))
    model.init_weights()
    return model


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 5) -> list[float]:
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, ARGS.vocab_size, (4, 33), generator=g)
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() * t.element_size()
        for state in opt.state.values()
        for key, t in state.items()
        if key != "step" and torch.is_tensor(t)
    )


# ---------------------------------------------------------------------------------------------
# parameter groups
# ---------------------------------------------------------------------------------------------
def test_no_decay_on_norms_and_embeddings():
    model = tiny_model()
    decay, no_decay = param_groups(model, OptimConfig(weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} == {
        "tok_embeddings.weight", "norm.weight",
        *(f"layers.{i}.{n}.weight" for i in range(2) for n in ("attention_norm", "ffn_norm")),
    }
    assert "output.weight" in {names[id(p)] for p in decay["params"]}


def test_tied_embedding_counted_once_and_not_decayed():
    model = tiny_model(tie=True)
    groups = param_groups(model, OptimConfig())
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert sum(p.numel() for g in groups for p in g["params"]) == count_params(model)
    assert id(model.output.weight) in {id(p) for p in groups[1]["params"]}
    # torch refuses a parameter in two groups: building must work
    build_optimizer(model, OptimConfig(), None)


def test_decay_everything_when_asked():
    model = tiny_model()
    (group,) = param_groups(model, OptimConfig(weight_decay=0.05, decay_norms_and_embeddings=True))
    assert group["weight_decay"] == 0.05 and len(group["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize(
    "name, states, expected",
    [
        (OptimName.adamw, None, torch.optim.AdamW),
        (OptimName.adam, None, torch.optim.Adam),
        (OptimName.sgd, None, torch.optim.SGD),
        (OptimName.adamw, BF16_STATES, BF16StateAdam),
        (OptimName.adam, BF16_STATES, BF16StateAdam),
        (OptimName.sgd, BF16_STATES, BF16StateSGD),
    ],
)
def test_build_optimizer_kinds(name, states, expected):
    opt = build_optimizer(tiny_model(), OptimConfig(name=name, lr=1e-3), states)
    assert type(opt) is expected
    assert opt.param_groups[1]["weight_decay"] == 0.0
    if isinstance(opt, BF16StateAdam):
        assert opt.param_groups[0]["decoupled"] is (name is OptimName.adamw)


@pytest.mark.parametrize("name", [OptimName.adamw, OptimName.adam])
def test_adam_on_cpu_defaults_to_the_fused_kernel_with_the_loop_update(name):
    # optim.fused=null on CPU in fp32: torch's fused kernel (one pass per tensor), same update as
    # torch's own default (the per-parameter loop) to fp32 rounding; an explicit value is kept.
    cfg = OptimConfig(name=name, lr=1e-2, weight_decay=0.1)
    model_fused, model_loop = tiny_model(), tiny_model()
    fused = build_optimizer(model_fused, cfg)
    loop = build_optimizer(model_loop, OptimConfig(name=name, lr=1e-2, weight_decay=0.1, fused=False))
    assert fused.defaults["fused"] is True and not loop.defaults["fused"]
    assert train(model_fused, fused, steps=3) == pytest.approx(train(model_loop, loop, steps=3), rel=1e-5)
    for a, b in zip(model_fused.parameters(), model_loop.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# bf16 optimizer states
# ---------------------------------------------------------------------------------------------
def test_stochastic_rounding_is_unbiased():
    x = torch.full((200_000,), 1.0 + 2**-10, dtype=torch.float32)  # 1/8 of a bf16 ulp above 1.0
    out = torch.empty_like(x, dtype=torch.bfloat16)
    copy_stochastic_(out, x, torch.Generator().manual_seed(0))
    assert set(out.float().unique().tolist()) == {1.0, 1.0 + 2**-7}  # only the two neighbours
    assert out.float().mean().item() == pytest.approx(x[0].item(), abs=2e-5)
    assert x.to(torch.bfloat16).float().mean().item() == 1.0  # round-to-nearest loses it all
    neg = torch.full((4,), -3.0)
    copy_stochastic_(out[:4], neg)
    assert out[:4].float().tolist() == [-3.0] * 4  # exactly representable values are kept


def test_bf16_states_halve_optimizer_memory_and_track_fp32():
    cfg = OptimConfig(lr=1e-2)
    model_ref, model_bf16 = tiny_model(), tiny_model()
    ref = build_optimizer(model_ref, cfg, PrecisionConfig())
    bf16 = build_optimizer(model_bf16, cfg, BF16_STATES)
    ref_losses, bf16_losses = train(model_ref, ref), train(model_bf16, bf16)

    ratio = state_bytes(ref) / state_bytes(bf16)
    assert ratio == pytest.approx(2.0, rel=1e-6)  # 8 -> 4 bytes per parameter
    assert state_bytes(bf16) == 4 * count_params(model_bf16)
    assert all(s["exp_avg"].dtype is torch.bfloat16 for s in bf16.state.values())
    assert all(p.dtype is torch.float32 for p in model_bf16.parameters())
    assert bf16_losses[-1] < bf16_losses[0] - 0.1
    assert bf16_losses == pytest.approx(ref_losses, rel=2e-3)


@pytest.mark.parametrize("name", [OptimName.adamw, OptimName.adam])
def test_bf16_adam_first_step_matches_torch(name):
    # Step 1 uses the fp32 moments before they are rounded: identical to torch's update.
    cfg = OptimConfig(name=name, lr=1e-2, weight_decay=0.1)
    model_ref, model_bf16 = tiny_model(), tiny_model()
    train(model_ref, build_optimizer(model_ref, cfg), steps=1)
    train(model_bf16, build_optimizer(model_bf16, cfg, BF16_STATES), steps=1)
    for a, b in zip(model_ref.parameters(), model_bf16.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_sgd_momentum_tracks_torch():
    cfg = OptimConfig(name=OptimName.sgd, lr=0.1, momentum=0.9, weight_decay=0.01)
    model_ref, model_bf16 = tiny_model(), tiny_model()
    ref = train(model_ref, build_optimizer(model_ref, cfg), steps=3)
    low = train(model_bf16, build_optimizer(model_bf16, cfg, BF16_STATES), steps=3)
    assert low == pytest.approx(ref, rel=1e-3)


def test_bf16_states_survive_a_state_dict_round_trip():
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(lr=1e-2), BF16_STATES)
    train(model, opt, steps=2)
    saved = opt.state_dict()
    fresh = build_optimizer(model, OptimConfig(lr=1e-2), BF16_STATES)
    fresh.load_state_dict(saved)  # torch casts states to the param dtype; the hook undoes it
    for a, b in zip(opt.state.values(), fresh.state.values()):
        assert b["exp_avg"].dtype is torch.bfloat16 and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    # Noise is reseeded from (seed, step, index): the resumed step equals the uninterrupted one.
    clone = tiny_model()
    clone.load_state_dict(model.state_dict())
    assert train(model, opt, steps=1) == train(clone, _rebind(fresh, clone), steps=1)


def _rebind(opt: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
    """The same optimizer state, bound to `model`'s parameters."""
    new = build_optimizer(model, OptimConfig(lr=1e-2), BF16_STATES)
    new.load_state_dict(opt.state_dict())
    return new


# ---------------------------------------------------------------------------------------------
# learning-rate schedules (100 steps, 10 warmup, floor 0.1)
# ---------------------------------------------------------------------------------------------
def schedule(name: LRScheduleName, **kw) -> LRScheduleConfig:
    return LRScheduleConfig(name=name, **{"warmup_steps": 10, "decay_fraction": 0.2, "min_lr_factor": 0.1, **kw})


@pytest.mark.parametrize("name", list(LRScheduleName))
def test_warmup_is_linear_and_never_zero(name):
    cfg = schedule(name)
    assert [lr_factor(s, cfg, 100) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])


def test_wsd_values():
    cfg = schedule(LRScheduleName.wsd)
    f = [lr_factor(s, cfg, 100) for s in range(100)]
    assert f[10:80] == [1.0] * 70  # stable until the last 20 steps
    assert f[80] == pytest.approx(1 - 0.9 / 20)
    assert f[89] == pytest.approx(0.55)  # half way down the decay
    assert f[99] == pytest.approx(0.1)


def test_cosine_values():
    cfg = schedule(LRScheduleName.cosine)
    assert lr_factor(10, cfg, 91) == pytest.approx(1.0)
    assert lr_factor(50, cfg, 91) == pytest.approx(0.55)  # mid-point of 10..90
    assert lr_factor(90, cfg, 91) == pytest.approx(0.1)
    assert lr_factor(30, cfg, 91) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))


def test_linear_and_constant_values():
    lin = schedule(LRScheduleName.linear)
    assert [lr_factor(s, lin, 101) for s in (10, 55, 100)] == pytest.approx([1.0, 0.55, 0.1])
    const = schedule(LRScheduleName.constant)
    assert [lr_factor(s, const, 101) for s in (10, 55, 100, 500)] == [1.0] * 4


def test_scheduler_drives_the_optimizer():
    model = nn.Linear(4, 4)
    opt = build_optimizer(model, OptimConfig(lr=1.0), None)
    sched = build_lr_scheduler(opt, schedule(LRScheduleName.linear, warmup_steps=2), total_steps=6)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.5, 1.0, 1.0, 0.7, 0.4, 0.1])
    assert all(g["lr"] == opt.param_groups[0]["lr"] for g in opt.param_groups)


# ---------------------------------------------------------------------------------------------
# bf16 states on FSDP2 (DTensor) parameters, two gloo ranks
# ---------------------------------------------------------------------------------------------
def _fsdp_worker(rank: int, world: int, port: int, results) -> None:
    import datetime
    import os

    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        model = tiny_model()  # same full weights on every rank; fully_shard keeps the local shard
        mesh = init_device_mesh("cpu", (world,))
        for block in model.layers.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = build_optimizer(model, OptimConfig(lr=1e-2), BF16_STATES)
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(3):
            tokens = torch.randint(0, ARGS.vocab_size, (4, 33), generator=g).chunk(world)[rank]
            loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world)
        states = [s["exp_avg"] for s in opt.state.values()]
        sharded_bf16 = all(isinstance(t, DTensor) and t.dtype is torch.bfloat16 for t in states)
        saved = get_optimizer_state_dict(model, opt)  # what DCP checkpoints
        saved_dtypes = {t.dtype for s in saved["state"].values() for k, t in s.items() if k != "step"}
        if rank == 0:
            results.put((sharded_bf16, saved_dtypes, losses))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_bf16_states_on_fsdp2_dtensor_params():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").Queue()
    mp.start_processes(_fsdp_worker, args=(2, port, results), nprocs=2, start_method="spawn")
    sharded_bf16, saved_dtypes, losses = results.get(timeout=10)
    assert sharded_bf16 and saved_dtypes == {torch.bfloat16}
    model = tiny_model()
    expected = train(model, build_optimizer(model, OptimConfig(lr=1e-2), BF16_STATES), steps=3)
    assert losses == pytest.approx(expected, rel=2e-3)  # the rounding noise differs per shard
