"""Pipeline parallelism trains exactly like one process: every schedule torch provides, alone
and composed with FSDP / DDP / TP / CP, gives the same initial weights (bit for bit), the
same losses and gradient norms (1e-5 / 5e-6 relative), the same weights after 5 AdamW steps and the
same validation loss. Both sides are titan's real `Trainer` (tests/parallel_harness.py). One
spawned gloo world per size (2, 4, 8 ranks) runs all of its layouts in turn. Planning and
stage-cutting checks (no processes) at the bottom.
"""

from __future__ import annotations

import atexit
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from parallel_harness import (
    ARGS,
    FINAL_ATOL,
    GRAD_NORM_RTOL,
    LOSS_RTOL,
    MAX_NORM,
    SEED,
    STEPS,
    parallel_config,
    run_reference,
    run_world,
)
from titan.checkpoint import step_dir
from titan.config.errors import ConfigError
from titan.config.schema import Device, TrainConfig
from titan.models.llama3 import Llama3
from titan.parallel import materialize_and_init, validate_layout
from titan.parallel.pipeline import (
    build_stage_modules,
    merged_view,
    rank_stages,
    resolve_microbatches,
    split_stages,
    stage_to_rank,
    stages_per_rank,
)

MODEL = ["model.n_layers=4"]  # 4 stages of one layer for the 2-stages-per-rank schedules
_RUN = tempfile.mkdtemp(prefix="titan-pp-dcp-")
atexit.register(shutil.rmtree, _RUN, ignore_errors=True)


def _pp(schedule: str, virtual: int = 1, *more: str) -> tuple[int, list[str]]:
    return 2, ["parallel=pp", f"parallel.pp_schedule={schedule}", f"parallel.pp_virtual_stages={virtual}", *MODEL, *more]


# key -> (world size, overrides)
LAYOUTS = {
    "GPipe": _pp("GPipe"),
    "1F1B": _pp("1F1B"),
    "Interleaved1F1B": _pp("Interleaved1F1B", 2),
    "LoopedBFS": _pp("LoopedBFS", 2),
    "InterleavedZeroBubble": _pp("InterleavedZeroBubble", 2),
    # V placement: rank 0 holds the first and the last stage; the Trainer's checkpointer
    # saves the stages with DCP at the last step.
    "ZBVZeroBubble": _pp("ZBVZeroBubble", 2, f"run_dir={_RUN}", f"checkpoint.interval={STEPS}"),
    "DualPipeV": _pp("DualPipeV", 1),  # pp_virtual_stages 1 is read as 2 for the V schedules
    # Two Pipeline.step calls per optimizer step (gradient accumulation), uneven layer split.
    "1F1B_accumulate_uneven": _pp(
        "1F1B", 1, "training.micro_batch_size=2", "parallel.pp_microbatches=2", "parallel.pp_layers_per_stage=[3,1]"
    ),
    "fsdp_pp": (4, ["parallel=fsdp_pp", *MODEL]),
    "fsdp_pp_zbv": (
        4,
        ["parallel=fsdp_pp", *MODEL, "parallel.pp_schedule=ZBVZeroBubble", "parallel.pp_virtual_stages=2", "parallel.pp_microbatches=2"],
    ),
    "fsdp_pp_interleaved_reshard_always": (
        4,
        ["parallel=fsdp_pp", *MODEL, "parallel.pp_schedule=Interleaved1F1B", "parallel.pp_virtual_stages=2",
         "parallel.pp_microbatches=2", "parallel.reshard_after_forward=always"],
    ),
    "ddp_pp": (4, ["parallel=fsdp_pp", *MODEL, "parallel.dp_replicate=-1", "parallel.dp_shard=1", "parallel.fsdp=false"]),
    "tp_pp": (4, ["parallel=fsdp_tp_pp", *MODEL, "parallel.nproc_per_node=4", "parallel.dp_shard=1"]),
    "cp_pp": (4, ["parallel=pp", *MODEL, "parallel.nproc_per_node=4", "parallel.dp_shard=1", "parallel.cp=2"]),
    "fsdp_tp_pp": (8, ["parallel=fsdp_tp_pp", *MODEL]),
}
_worlds: dict[int, dict] = {}
_reference: dict = {}


def reference() -> dict:
    if not _reference:
        _reference.update(run_reference(MODEL))
    return _reference


def world_results(world: int) -> dict:
    if world not in _worlds:
        _worlds[world] = run_world(world, [(k, over) for k, (w, over) in LAYOUTS.items() if w == world])
    return _worlds[world]


def result(key: str) -> dict:
    got = world_results(LAYOUTS[key][0]).get(key, {"error": "layout did not run (an earlier layout in its world failed)"})
    assert "error" not in got, got["error"]
    return got


@pytest.mark.slow
@pytest.mark.parametrize("key", list(LAYOUTS))
def test_pipeline_matches_single_process(key: str) -> None:
    ref, got = reference(), result(key)
    assert got["init"].keys() == ref["init"].keys()
    for name, expected in ref["init"].items():
        assert torch.equal(got["init"][name], expected), f"initial {name} differs"
    assert len(got["losses"]) == len(ref["losses"])
    for step, (a, b) in enumerate(zip(got["losses"], ref["losses"])):
        assert math.isclose(a, b, rel_tol=LOSS_RTOL), f"step {step}: loss {a} vs {b}"
    for step, (a, b) in enumerate(zip(got["grad_norms"], ref["grad_norms"])):
        assert math.isclose(a, b, rel_tol=GRAD_NORM_RTOL), f"step {step}: grad norm {a} vs {b}"
    assert ref["grad_norms"][0] > MAX_NORM  # clipping was exercised
    for name, expected in ref["final"].items():
        torch.testing.assert_close(got["final"][name], expected, rtol=0, atol=FINAL_ATOL, msg=f"final {name}")
    assert math.isclose(got["val_loss"], ref["val_loss"], rel_tol=LOSS_RTOL)


@pytest.mark.slow
def test_loss_reaches_rank0_when_it_does_not_hold_the_last_stage() -> None:
    """1F1B: rank 0 has the first stage only; V schedules: the first and the last."""
    assert result("1F1B")["has_first_last"] == (True, False)
    assert result("ZBVZeroBubble")["has_first_last"] == (True, True)
    assert result("1F1B")["n_microbatches"] == 2  # pp_microbatches=-1: one per stage
    assert result("DualPipeV")["n_microbatches"] == 4


@pytest.mark.slow
def test_stage_checkpoint_loads_into_the_whole_model() -> None:
    """DCP files written by the V-placed stages (rank 0: embedding, layers 0 and 3, norm,
    output; rank 1: layers 1 and 2) hold full-model names: one process loads them whole."""
    import torch.distributed.checkpoint as dcp

    got = result("ZBVZeroBubble")
    assert "tok_embeddings.weight" in got["stage_keys"] and "layers.3.attention.wq.weight" in got["stage_keys"]
    assert not any(k.startswith(("layers.1.", "layers.2.")) for k in got["stage_keys"])
    model = _meta_model()
    model.to_empty(device="cpu")
    state = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}}
    dcp.load(state, checkpoint_id=str(step_dir(Path(_RUN) / "checkpoints", STEPS)))
    assert state["model"].keys() == got["final"].keys()
    for name, value in state["model"].items():
        assert torch.equal(value, got["final"][name]), name


# ---------------------------------------------------------------------------------------------
# Planning (pure, fast)
# ---------------------------------------------------------------------------------------------
def test_split_stages_even_and_uneven() -> None:
    assert split_stages(4, 2) == [[0, 1], [2, 3]]
    assert split_stages(8, 2, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # Spare layers: middle stages first, then the first, never the last (output + loss).
    assert split_stages(6, 2, 2) == [[0], [1, 2], [3, 4], [5]]
    assert split_stages(7, 2, 2) == [[0, 1], [2, 3], [4, 5], [6]]
    assert split_stages(5, 2) == [[0, 1, 2], [3, 4]]
    assert split_stages(4, 2, layers_per_stage=[3, 1]) == [[0, 1, 2], [3]]
    assert split_stages(3, 2, layers_per_stage=[0, 3]) == [[], [0, 1, 2]]


@pytest.mark.parametrize(
    "args, words",
    [
        ((3, 2, 2, None), "need at least that many layers"),
        ((4, 2, 1, [2, 1]), "sum to model.n_layers=4"),
        ((4, 2, 1, [4]), "1 entries for 2 stages"),
        ((4, 2, 1, [5, -1]), "non-negative"),
    ],
)
def test_split_stages_errors(args, words) -> None:
    with pytest.raises(ConfigError, match=words):
        split_stages(*args)


def test_stage_placement_loop_and_v() -> None:
    assert [stage_to_rank(s, 2, v_shaped=False) for s in range(4)] == [0, 1, 0, 1]
    assert [stage_to_rank(s, 2, v_shaped=True) for s in range(4)] == [0, 1, 1, 0]
    assert rank_stages(0, 4, 8, v_shaped=True) == [0, 7]
    assert rank_stages(3, 4, 8, v_shaped=True) == [3, 4]
    assert rank_stages(1, 4, 8, v_shaped=False) == [1, 5]


def test_stages_per_rank_must_fit_the_schedule() -> None:
    assert stages_per_rank("Interleaved1F1B", 3) == 3
    with pytest.raises(ConfigError, match="one stage per rank"):
        stages_per_rank("1F1B", 2)
    assert stages_per_rank("ZBVZeroBubble", 1) == stages_per_rank("DualPipeV", 2) == 2  # V: always 2
    with pytest.raises(ConfigError, match="exactly 2 stages per rank"):
        stages_per_rank("ZBVZeroBubble", 3)


def test_resolve_microbatches() -> None:
    cfg = parallel_config("pp")
    assert resolve_microbatches(cfg, 8) == (2, 4)  # -1: one per stage
    assert resolve_microbatches(parallel_config("pp", pp_microbatches=8), 8) == (8, 1)
    assert resolve_microbatches(parallel_config("pp_zb"), 8) == (4, 2)
    with pytest.raises(ConfigError, match="do not split training.micro_batch_size=6"):
        resolve_microbatches(parallel_config("pp", pp_microbatches=4), 6)
    with pytest.raises(ConfigError, match="1F1B with 2 stages needs at least 2"):
        resolve_microbatches(parallel_config("pp", pp_microbatches=1), 4)
    with pytest.raises(ConfigError, match="DualPipeV with 4 stages needs at least 4"):
        resolve_microbatches(parallel_config("pp_zb", pp_schedule="DualPipeV", pp_microbatches=2), 4)
    assert resolve_microbatches(parallel_config("pp", pp_schedule="GPipe", pp_microbatches=1), 4) == (1, 4)


def _train_cfg(preset: str, **parallel) -> TrainConfig:
    cfg = TrainConfig()
    cfg.parallel = parallel_config(preset, **parallel)
    cfg.model.dim, cfg.model.n_heads, cfg.model.n_kv_heads, cfg.model.vocab_size = 256, 16, 8, 2048
    cfg.training.global_batch_size, cfg.training.micro_batch_size, cfg.training.seq_len = 16, 4, 256
    cfg.training.device = Device.cpu
    return cfg


@pytest.mark.parametrize("preset", ["pp", "fsdp_pp", "fsdp_tp_pp", "pp_zb", "pp_interleaved"])
def test_pp_presets_validate_at_their_size(preset: str) -> None:
    cfg = _train_cfg(preset)
    validate_layout(cfg, cfg.parallel.nproc_per_node)


def test_layout_refuses_bad_pipelines() -> None:
    cfg = _train_cfg("pp")
    cfg.model.tie_embeddings = True
    with pytest.raises(ConfigError, match="tied embedding") as err:
        validate_layout(cfg, 2)
    assert err.value.key == "model.tie_embeddings"
    with pytest.raises(ConfigError) as err:
        validate_layout(_train_cfg("pp", pp_microbatches=3), 2)
    assert err.value.key == "parallel.pp_microbatches"
    with pytest.raises(ConfigError) as err:
        validate_layout(_train_cfg("pp_zb", pp_virtual_stages=3), 2)
    assert err.value.key == "parallel.pp_virtual_stages"
    cfg = _train_cfg("pp_interleaved")
    cfg.model.n_layers = 3
    with pytest.raises(ConfigError, match="at least that many layers"):
        validate_layout(cfg, 2)


# ---------------------------------------------------------------------------------------------
# Stage modules (one process)
# ---------------------------------------------------------------------------------------------
def _meta_model() -> Llama3:
    import dataclasses

    with torch.device("meta"):
        return Llama3(dataclasses.replace(ARGS, n_layers=4))


def test_stages_chain_to_the_full_model() -> None:
    """Pruned stages keep full-model names, partition the parameters, get the full model's
    weights from `materialize_and_init`, and chained give the full model's logits."""
    full = _meta_model()
    materialize_and_init(full, torch.device("cpu"), SEED)
    split = split_stages(ARGS.n_layers + 2, 2, 2)  # MODEL has 4 layers: one per stage
    stages = []
    for idx, layers in enumerate(split):
        stage = build_stage_modules(_meta_model(), layers, idx, len(split))
        materialize_and_init(stage, torch.device("cpu"), SEED)
        stages.append(stage)
    keys = [set(s.state_dict()) for s in stages]
    assert set().union(*keys) == set(full.state_dict()) and sum(map(len, keys)) == len(full.state_dict())
    assert "tok_embeddings.weight" in keys[0] and "output.weight" in keys[-1]
    assert keys[2] == {k for k in full.state_dict() if k.startswith("layers.2.")}
    for stage in stages:
        for name, value in stage.state_dict().items():
            assert torch.equal(value, full.state_dict()[name]), name

    tokens = torch.randint(0, ARGS.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    h = tokens
    with torch.no_grad():
        for stage in stages:
            h = stage(h)
        torch.testing.assert_close(h, full(tokens), rtol=0, atol=0)

    view = merged_view([stages[0], stages[3]])  # rank 0 under the V placement
    assert set(view.state_dict()) == keys[0] | keys[3]
    with pytest.raises(RuntimeError, match="not callable"):
        view(tokens)


def test_tied_embedding_cannot_be_split() -> None:
    import dataclasses

    with torch.device("meta"):
        model = Llama3(dataclasses.replace(ARGS, tie_embeddings=True))
    with pytest.raises(ConfigError, match="tied embedding"):
        build_stage_modules(model, [0], 0, 2)
