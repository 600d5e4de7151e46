"""Low-precision training: float8 recipes and MXFP8 track fp32, mxfp8 refuses CPUs, bf16 paths."""

from __future__ import annotations

import datetime
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from titan.config.errors import ConfigError
from titan.config.schema import DType, Float8Recipe, PrecisionConfig, TrainConfig
from titan.models.llama3 import Llama3, LlamaArgs
from titan.precision import (
    build_precision,
    convert_float8,
    float8_post_optimizer_hook,
    mixed_precision,
    validate_precision,
)
from titan.train.launch import free_port

# multiple_of=32: FFN hidden 192, divisible by 16 (float8) and 32 (MX blocks).
ARGS = LlamaArgs(dim=64, n_layers=2, n_heads=4, vocab_size=128, multiple_of=32, max_seq_len=32)
BLOCK_LINEARS = {f"layers.{i}.{n}" for i in range(2) for n in (
    "attention.wq", "attention.wk", "attention.wv", "attention.wo",
    "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}


def tiny_model(device: str = "cpu") -> Llama3:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Llama3(ARGS)
    return model if device == "meta" else materialize(model)


def materialize(model: Llama3) -> Llama3:
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights(buffer_device=torch.device("cpu"))
    return model


def batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, ARGS.vocab_size, (4, 33), generator=g) for _ in range(n)]


def loss_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def train(model: nn.Module, steps: int = 5, autocast=None) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for tokens in batches(steps):
        with autocast() if autocast else torch.autocast("cpu", enabled=False):
            loss = loss_of(model, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def fp32_losses() -> list[float]:
    return train(tiny_model())


def precision(recipe: Float8Recipe, **kw) -> PrecisionConfig:
    return PrecisionConfig(name=recipe.value, float8=recipe, **kw)


@pytest.mark.parametrize(
    "recipe",
    [Float8Recipe.tensorwise, Float8Recipe.rowwise, Float8Recipe.rowwise_with_gw_hp, Float8Recipe.mxfp8_emulated],
)
def test_low_precision_recipe_tracks_fp32(recipe, fp32_losses):
    # Converted on meta, as the trainer does, then materialised.
    model = tiny_model("meta")
    converted = convert_float8(model, precision(recipe), "cpu", fsdp_enabled=False)
    assert set(converted) == BLOCK_LINEARS  # every block linear, never `output`
    materialize(model)
    wq = model.layers["0"].attention.wq
    if recipe is Float8Recipe.mxfp8_emulated:
        assert "MXFP8" in type(wq.weight).__name__
    else:
        assert type(wq).__name__ == "Float8Linear"
    assert isinstance(model.output, nn.Linear) and type(model.output) is nn.Linear
    assert set(model.state_dict()) == set(tiny_model("meta").state_dict())

    losses = train(model)
    assert losses[-1] < losses[0] - 0.1
    for lp, ref in zip(losses, fp32_losses):
        assert lp == pytest.approx(ref, rel=1e-2)
    assert losses != fp32_losses  # really ran in low precision


def test_filter_skips_small_odd_and_output_linears():
    model = nn.ModuleDict({
        "ok": nn.Linear(64, 32),
        "odd": nn.Linear(64, 40),  # 40 not divisible by 16
        "small": nn.Linear(64, 16),  # below float8_min_dim=32
        "output": nn.Linear(64, 128),
    })
    cfg = precision(Float8Recipe.rowwise, float8_min_dim=32)
    assert convert_float8(model, cfg, "cpu", fsdp_enabled=False) == ["ok"]
    assert type(model["ok"]).__name__ == "Float8Linear"
    assert all(type(model[k]) is nn.Linear for k in ("odd", "small", "output"))


def test_mx_keeps_biased_linears_in_high_precision():
    # torchao 0.18's MXFP8 linear override drops the bias: such layers must not be converted.
    model = nn.ModuleDict({"plain": nn.Linear(64, 64, bias=False), "biased": nn.Linear(64, 64)})
    names = convert_float8(model, precision(Float8Recipe.mxfp8_emulated), "cpu", fsdp_enabled=False)
    assert names == ["plain"]


def test_mxfp8_on_cpu_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="Blackwell.*precision=mxfp8_emulated") as err:
        convert_float8(tiny_model("meta"), precision(Float8Recipe.mxfp8), "cpu", fsdp_enabled=False)
    assert err.value.key == "precision.float8"
    cfg = TrainConfig()
    cfg.training.device = cfg.training.device.cpu
    cfg.precision = precision(Float8Recipe.mxfp8)
    with pytest.raises(ConfigError, match="SM100"):
        validate_precision(cfg)


def test_mxfp8_hardware_rule():
    from titan.precision.mx import mxfp8_hardware_problem

    assert "SM90" in mxfp8_hardware_problem("cuda", (9, 0))  # H100: emulated only
    assert mxfp8_hardware_problem("cuda", (10, 0)) is None  # B200
    assert mxfp8_hardware_problem("cuda", (12, 0)) is None


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda c: setattr(c.model, "dim", 200), "model.dim"),  # 200 % 16 != 0
        (lambda c: setattr(c.model, "multiple_of", 24), "model.multiple_of"),  # FFN 696 % 16 != 0
        (lambda c: setattr(c.parallel, "tp", 2), "parallel.tp"),  # MX + TP is silently fp32
        (lambda c: setattr(c.precision, "param_dtype", DType.float16), "precision.param_dtype"),
    ],
)
def test_validate_refuses_impossible_combinations(change, key):
    cfg = TrainConfig()
    cfg.precision = precision(Float8Recipe.mxfp8_emulated if key == "parallel.tp" else Float8Recipe.tensorwise)
    validate_precision(cfg)  # the default model is fine
    change(cfg)
    with pytest.raises(ConfigError) as err:
        validate_precision(cfg)
    assert err.value.key == key


def test_rowwise_with_tp_and_default_all_gather_flag_is_accepted():
    cfg = TrainConfig()
    cfg.precision = precision(Float8Recipe.rowwise)  # fsdp_float8_all_gather defaults to True
    cfg.parallel.tp = 2  # measured: rowwise float8 + TP (plain styles) matches on gloo
    validate_precision(cfg)


def test_bf16_autocast_without_fsdp(caplog, fp32_losses):
    cfg = PrecisionConfig(name="bf16", param_dtype=DType.bfloat16)
    with caplog.at_level(logging.WARNING, logger="titan"):
        mp = mixed_precision(cfg, "cpu", fsdp_enabled=False)
    assert "slow" in caplog.text
    model = tiny_model()
    with mp.autocast():
        assert model(batches(1)[0][:, :-1]).dtype is torch.bfloat16
    losses = train(model, steps=2, autocast=mp.autocast)
    assert all(p.dtype is torch.float32 for p in model.parameters())  # fp32 master weights
    assert losses == pytest.approx(fp32_losses[:2], rel=2e-2)


def test_fsdp_casts_so_no_autocast():
    """Under FSDP2 the parameters are cast at all-gather (titan.parallel.fsdp builds the
    MixedPrecisionPolicy from the same PrecisionConfig): no autocast on top."""
    mp = mixed_precision(PrecisionConfig(param_dtype=DType.bfloat16), "cuda", fsdp_enabled=True)
    assert (mp.param_dtype, mp.reduce_dtype) == (torch.bfloat16, torch.float32)
    with mp.autocast():
        assert not torch.is_autocast_enabled("cpu")
    fp32 = mixed_precision(PrecisionConfig(), "cpu", fsdp_enabled=False)
    with fp32.autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_post_optimizer_hook_is_a_noop_without_float8_all_gather():
    model = tiny_model()
    before = [p.clone() for p in model.parameters()]
    float8_post_optimizer_hook(model)
    build_precision(PrecisionConfig(), "cpu", fsdp_enabled=False).after_optimizer_step(model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ---------------------------------------------------------------------------------------------
# Two gloo ranks: float8 tensorwise + FSDP2 float8 all-gather, as the trainer composes it.
# ---------------------------------------------------------------------------------------------
def _fsdp_worker(rank: int, world: int, port: int, results) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    from titan.models.llama3 import rope_table
    from titan.parallel.fsdp import apply_fsdp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        prec = build_precision(precision(Float8Recipe.tensorwise), "cpu", fsdp_enabled=True)
        model = tiny_model("meta")
        prec.convert(model)
        mesh = init_device_mesh("cpu", (world,))
        apply_fsdp(model, mesh)  # as the trainer shards (fp32: precision's dtypes)
        # Same weights as one process: initialise whole, then keep this rank's shard.
        full = materialize(tiny_model("meta")).state_dict()
        model.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.to_local().copy_(distribute_tensor(full[name], mesh, p.placements, src_data_rank=None).to_local())
        model.rope = rope_table(ARGS)  # non-persistent buffer: recomputed after to_empty
        gathered_in_float8 = type(model.layers["0"].attention.wq.weight.to_local()).__name__
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for tokens in batches(3):
            loss = loss_of(model, tokens.chunk(world)[rank])
            loss.backward()
            opt.step()
            opt.zero_grad()
            prec.after_optimizer_step(model)
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world)
        if rank == 0:
            results.put((gathered_in_float8, losses))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_float8_all_gather_with_fsdp_matches_one_process():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    mp.start_processes(_fsdp_worker, args=(2, free_port(), results), nprocs=2, start_method="spawn")
    weight_type, losses = results.get(timeout=10)
    assert weight_type == "WeightWithDynamicFloat8CastTensor"

    model = tiny_model("meta")
    convert_float8(model, precision(Float8Recipe.tensorwise), "cpu", fsdp_enabled=False)
    opt = torch.optim.AdamW(materialize(model).parameters(), lr=1e-2)
    expected = []
    for tokens in batches(3):
        loss = loss_of(model, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad()
        expected.append(loss.item())
    # float8 all-gather casts each shard's scale path differently from a local cast: ~1e-4 apart
    # (the same bound as the fsdp float8 layout in test_parallel_numerics.py).
    assert losses == pytest.approx(expected, rel=1e-3)
