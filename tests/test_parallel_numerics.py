"""Every parallel layout trains exactly like one process: same initial weights (bit for bit),
same losses (1e-5 relative) and gradient norms (5e-6), same weights after 5 AdamW steps, same
validation loss. Each side is titan's real `Trainer` (tests/parallel_harness.py): composed from
conf/ like the CLI, stepped through `Trainer.train_step` on its own loader's batches.

Real gloo worlds (2 and 4 ranks on this machine), one spawned world per size running all of
its layouts in turn; one single-process reference per model/precision. Layout checks (no
processes) at the bottom.
"""

from __future__ import annotations

import math

import pytest
import torch

from parallel_harness import ARGS, FINAL_ATOL, GRAD_NORM_RTOL, LOSS_RTOL, MAX_NORM, SEED, parallel_config, run_reference, run_world
from titan.config.errors import ConfigError
from titan.config.schema import Device, ParallelConfig, TrainConfig
from titan.models.llama3 import Llama3
from titan.parallel import clip_grad_norm_, materialize_and_init, resolve_degrees, validate_layout

F8 = "precision=float8_tensorwise"
# key -> (world size, overrides, expected degrees (dp_replicate, dp_shard, cp, tp))
LAYOUTS = {
    "ddp": (2, ["parallel=ddp"], (2, 1, 1, 1)),
    "fsdp": (2, ["parallel=fsdp"], (1, 2, 1, 1)),
    "fsdp_reshard_never": (2, ["parallel=fsdp", "parallel.reshard_after_forward=never"], (1, 2, 1, 1)),
    # Two micro-batches per rank: gradient accumulation inside train_step.
    "fsdp_cpu_offload": (2, ["parallel=fsdp", "parallel.cpu_offload=true"], (1, 2, 1, 1)),
    "fsdp_accumulate": (2, ["parallel=fsdp", "training.micro_batch_size=1"], (1, 2, 1, 1)),
    "tp": (2, ["parallel=tp"], (1, 1, 1, 2)),
    # The compiled loss on vocab-sharded logits (loss parallel); aot_eager: no C++ compile.
    "tp_compiled_loss": (2, ["parallel=tp", "compile.loss=true", "compile.backend=aot_eager"], (1, 1, 1, 2)),
    "tp_no_sp_no_loss_parallel": (2, ["parallel=tp", "parallel.sequence_parallel=false", "parallel.loss_parallel=false"], (1, 1, 1, 2)),
    "cp_ring": (2, ["parallel=cp", "parallel.cp_mode=ring"], (1, 1, 2, 1)),  # allgather: fsdp_cp, cp_tp
    "hsdp": (4, ["parallel=hsdp"], (2, 2, 1, 1)),
    "fsdp_tp": (4, ["parallel=fsdp_tp"], (1, 2, 1, 2)),
    "fsdp4": (4, ["parallel=fsdp"], (1, 4, 1, 1)),
    "ddp_tp": (4, ["parallel=ddp", "parallel.tp=2"], (2, 1, 1, 2)),
    "fsdp_cp": (4, ["parallel=fsdp_cp"], (1, 2, 2, 1)),
    # cp x tp: the cp groups {0, 2} and {1, 3} are not runs of consecutive ranks.
    "cp_tp": (4, ["parallel=cp", "parallel.cp=2", "parallel.tp=2"], (1, 1, 2, 2)),
    # Tied embedding/output: TP must re-tie the two sharded weights, FSDP keep them in one group.
    "fsdp_tp_tied": (4, ["parallel=fsdp_tp", "model.tie_embeddings=true"], (1, 2, 1, 2)),
    "tp_tied": (2, ["parallel=tp", "model.tie_embeddings=true"], (1, 1, 1, 2)),
    # torchao float8 block linears: under TP (plain styles: gloo cannot all-gather float8) and
    # under FSDP with float8 all-gather (the init must write through torchao's weight wrapper).
    "tp_float8": (2, ["parallel=tp", F8], (1, 1, 1, 2)),
    "fsdp_float8_all_gather": (2, ["parallel=fsdp", F8, "precision.fsdp_float8_all_gather=true"], (1, 2, 1, 1)),
}
# Float8 FSDP all-gather casts each shard with the global scale: same values, but the
# float8 matmuls see different rounding paths, so only float8-level agreement is expected.
FLOAT8_RTOL = {"fsdp_float8_all_gather": 1e-3}
_worlds: dict[int, dict] = {}
_references: dict = {}


def reference_for(key: str) -> dict:
    """The single-process run with the layout's model / precision / batch overrides."""
    same = tuple(o for o in LAYOUTS[key][1] if not o.startswith("parallel"))
    if same not in _references:
        _references[same] = run_reference(same)
    return _references[same]


def world_results(world: int) -> dict:
    """Spawn each world once per module, running all of its layouts."""
    if world not in _worlds:
        _worlds[world] = run_world(world, [(k, over) for k, (w, over, _) in LAYOUTS.items() if w == world])
    return _worlds[world]


@pytest.mark.slow
@pytest.mark.parametrize("key", list(LAYOUTS))
def test_layout_matches_single_process(key: str) -> None:
    world, _, (dp_replicate, dp_shard, cp, tp) = LAYOUTS[key]
    reference = reference_for(key)
    float8 = any(o.startswith("precision=float8") for o in LAYOUTS[key][1])
    loss_rtol, norm_rtol = FLOAT8_RTOL.get(key, LOSS_RTOL), FLOAT8_RTOL.get(key, GRAD_NORM_RTOL)
    got = world_results(world).get(key, {"error": "layout did not run (an earlier layout in its world failed)"})
    assert "error" not in got, got["error"]
    d = got["degrees"]
    assert (d["dp_replicate"], d["dp_shard"], d["cp"], d["tp"]) == (dp_replicate, dp_shard, cp, tp)
    assert got["cpu_offload"] == ("parallel.cpu_offload=true" in LAYOUTS[key][1])
    if "compile.loss=true" in LAYOUTS[key][1]:
        assert got["compiled_graphs"] > 0 and reference["compiled_graphs"] > 0

    assert got["init"].keys() == reference["init"].keys()
    for name, expected in reference["init"].items():
        assert torch.equal(got["init"][name], expected), f"initial {name} differs"

    assert len(got["losses"]) == len(reference["losses"])
    for step, (a, b) in enumerate(zip(got["losses"], reference["losses"])):
        assert math.isclose(a, b, rel_tol=loss_rtol), f"step {step}: loss {a} vs {b}"
    for step, (a, b) in enumerate(zip(got["grad_norms"], reference["grad_norms"])):
        assert math.isclose(a, b, rel_tol=norm_rtol), f"step {step}: grad norm {a} vs {b}"
    assert reference["grad_norms"][0] > MAX_NORM  # so clipping was exercised
    assert math.isclose(got["val_loss"], reference["val_loss"], rel_tol=loss_rtol)

    if float8:  # AdamW turns float8 rounding differences into whole-LR steps on tiny gradients
        return
    for name, expected in reference["final"].items():
        torch.testing.assert_close(got["final"][name], expected, rtol=0, atol=FINAL_ATOL, msg=f"final {name}")


# ---------------------------------------------------------------------------------------------
# Single-process pieces (no process group)
# ---------------------------------------------------------------------------------------------
def _meta_model() -> Llama3:
    with torch.device("meta"):
        return Llama3(ARGS)


def test_materialize_and_init_equals_init_weights_in_one_process() -> None:
    torch.manual_seed(SEED)
    ref = _meta_model()
    ref.to_empty(device="cpu")
    ref.init_weights()
    model = _meta_model()
    materialize_and_init(model, torch.device("cpu"), SEED)
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    torch.testing.assert_close(model.rope, ref.rope, rtol=0, atol=0)


def test_init_groups_are_independent_of_the_rest_of_the_model() -> None:
    """A pipeline stage holding only layer 1 gets the full model's layer 1."""
    full = _meta_model()
    materialize_and_init(full, torch.device("cpu"), SEED)
    stage = _meta_model()
    del stage.layers["0"]
    stage.tok_embeddings = None
    materialize_and_init(stage, torch.device("cpu"), SEED)
    for name, value in stage.state_dict().items():
        assert torch.equal(value, full.state_dict()[name]), name


def test_clip_grad_norm_matches_torch_on_plain_tensors() -> None:
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p) * 3
        q.grad = p.grad.clone()
    ours = clip_grad_norm_(a, 1.0)
    theirs = torch.nn.utils.clip_grad_norm_(b, 1.0)
    torch.testing.assert_close(ours, theirs)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad)


def test_grad_norm_is_exact_to_fp32_rounding_on_a_gradient_with_a_few_large_rows() -> None:
    """Like the output projection's gradient (the batch's tokens' rows dominate): torch's fp32
    CPU norm kernel is ~5e-5 low on this; titan's norm matches fp64 to fp32 rounding."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(2048, 64))
    p.grad = torch.randn(2048, 64) * 1e-4
    p.grad[:16] *= 1000
    exact = torch.linalg.vector_norm(p.grad.double()).item()
    assert clip_grad_norm_([p], 0.0).item() == pytest.approx(exact, rel=1e-7)


# ---------------------------------------------------------------------------------------------
# Degrees and layout validation (pure, fast)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "preset, world, expected",
    [
        ("single", 1, (1, 1, 1, 1, 1)),
        ("ddp", 2, (1, 2, 1, 1, 1)),
        ("fsdp", 2, (1, 1, 2, 1, 1)),
        ("fsdp", 8, (1, 1, 8, 1, 1)),
        ("hsdp", 4, (1, 2, 2, 1, 1)),
        ("tp", 2, (1, 1, 1, 1, 2)),
        ("fsdp_tp", 4, (1, 1, 2, 1, 2)),
    ],
)
def test_resolve_degrees_presets(preset: str, world: int, expected: tuple) -> None:
    degrees = resolve_degrees(parallel_config(preset), world)
    assert tuple(degrees) == ("pp", "dp_replicate", "dp_shard", "cp", "tp")
    assert tuple(degrees.values()) == expected


@pytest.mark.parametrize(
    "fields, world, key, words",
    [
        ({"dp_shard": -1, "tp": -1}, 4, "parallel.tp", "only one degree may be -1"),
        ({"dp_shard": 2, "tp": 2}, 8, "parallel", "world size is 8"),
        ({"dp_shard": -1, "tp": 3}, 4, "parallel.dp_shard", "does not divide"),
        ({"dp_shard": -1, "tp": 0}, 4, "parallel.tp", "not a degree"),
    ],
)
def test_resolve_degrees_errors(fields: dict, world: int, key: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as err:
        resolve_degrees(ParallelConfig(**fields), world)
    assert err.value.key == key


def _train_cfg(preset: str, **parallel) -> TrainConfig:
    cfg = TrainConfig()
    cfg.parallel = parallel_config(preset, **parallel)
    cfg.model.dim, cfg.model.n_heads, cfg.model.n_kv_heads, cfg.model.vocab_size = 256, 16, 8, 2048
    cfg.training.global_batch_size, cfg.training.micro_batch_size, cfg.training.seq_len = 8, 2, 256
    cfg.training.device = Device.cpu
    return cfg


@pytest.mark.parametrize("preset", ["single", "ddp", "fsdp", "hsdp", "tp", "fsdp_tp"])
def test_presets_validate_at_their_size(preset: str) -> None:
    cfg = _train_cfg(preset)
    validate_layout(cfg, cfg.parallel.nproc_per_node)


def _layout_error(cfg: TrainConfig, world: int) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        validate_layout(cfg, world)
    return err.value


def test_tp_must_divide_heads_and_kv_heads() -> None:
    cfg = _train_cfg("tp", tp=3, dp_shard=-1)
    cfg.model.n_heads, cfg.model.dim = 12, 192
    assert _layout_error(cfg, 3).key == "model.n_kv_heads"  # 12 heads ok, 8 kv heads not
    cfg = _train_cfg("tp", tp=32)
    cfg.model.n_kv_heads = None
    err = _layout_error(cfg, 32)
    assert err.key == "model.n_heads" and "parallel.tp=32" in str(err)


def test_tp_must_divide_vocab_and_sequence() -> None:
    cfg = _train_cfg("tp")
    cfg.model.vocab_size = 2049
    assert _layout_error(cfg, 2).key == "model.vocab_size"
    cfg = _train_cfg("tp")
    cfg.training.seq_len = 255
    assert _layout_error(cfg, 2).key == "training.seq_len"
    cfg.parallel.sequence_parallel = False
    validate_layout(cfg, 2)  # without SP the sequence is not split


def test_global_batch_must_split_over_dp_and_micro_batches() -> None:
    cfg = _train_cfg("fsdp")
    cfg.training.micro_batch_size = 8  # 8 sequences / (2 ranks x 8) does not split
    err = _layout_error(cfg, 2)
    assert err.key == "training.global_batch_size" and "multiple of 16" in str(err)
    cfg = _train_cfg("fsdp_tp")  # dp=2 only: tp ranks share their batch
    cfg.training.micro_batch_size = 4
    validate_layout(cfg, 4)


def test_async_tp_is_refused_on_cpu() -> None:
    cfg = _train_cfg("tp", async_tp=True)
    err = _layout_error(cfg, 2)
    assert err.key == "parallel.async_tp"
    assert "async TP needs CUDA + NCCL (symmetric memory); set parallel.async_tp=false on CPU" in str(err)


def test_fsdp_false_cannot_shard() -> None:
    err = _layout_error(_train_cfg("fsdp", fsdp=False), 2)
    assert err.key == "parallel.fsdp" and "dp_replicate" in str(err)
    validate_layout(_train_cfg("ddp"), 2)  # fsdp=false is fine when nothing is sharded
