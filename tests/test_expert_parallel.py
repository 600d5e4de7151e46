"""Expert parallelism through the real CLI: fp32 losses and gradient norms under ep equal
one process's (aux loss and bias balancing on), a checkpoint saved under ep=2
resumes in one process (ep=1), and layouts that cannot work are refused before launch."""

from __future__ import annotations

import math

import pytest

from tests.helpers import run_titan
from tests.test_config import compose_typed
from titan.config.errors import ConfigError
from titan.config.validate import validate

MOE = [
    "model=qwen3_moe_debug", "model.dim=64", "model.n_layers=2", "model.head_dim=16", "model.moe.expert_hidden=32",
    "model.moe.bias_update_rate=0.01", "training.global_batch_size=4", "optim=sgd", "optim.lr=0.1",
]
_runs: dict = {}


def _run(tmp_path_factory, name: str, *extra: str):
    if name not in _runs:
        _runs[name] = run_titan(tmp_path_factory.mktemp(name), *MOE, "training.steps=4", *extra).check()
    return _runs[name]


@pytest.mark.slow
@pytest.mark.parametrize("layout, procs", [("ep", 2)])  # fsdp_ep, ep_tp, ep_pp: tests/test_ep_composition.py
def test_ep_layouts_match_single_process(tmp_path_factory, layout, procs):
    single = _run(tmp_path_factory, "single")
    got = _run(tmp_path_factory, layout, f"parallel={layout}")
    assert len(got.train) == len(single.train) == 4
    for a, b in zip(got.train, single.train):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a["step"], a["loss"], b["loss"])
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-5)
        # Per-expert load is counted over the whole batch: the same routing on every layout.
        assert a["moe_load_max_over_mean"] == b["moe_load_max_over_mean"] > 1.0
    assert single.losses[-1] < single.losses[0]


@pytest.mark.slow
def test_checkpoint_saved_under_ep2_resumes_in_one_process(tmp_path):
    first = run_titan(tmp_path / "ep", *MOE, "training.steps=4", "checkpoint.interval=2", "parallel=ep").check()
    ckpt = first.run_dir / "checkpoints" / "step-00000002"
    assert (ckpt / ".complete").exists()
    resumed = run_titan(tmp_path / "one", *MOE, "training.steps=4", f"checkpoint.resume={ckpt}").check()
    assert [r["step"] for r in resumed.train] == [3, 4]
    for a, b in zip(resumed.train, first.train[2:]):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5) and math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-5)


@pytest.mark.parametrize(
    "overrides, world, key",
    [
        (["model=qwen3_moe_debug", "parallel=ep", "parallel.ep=3"], 2, "parallel.ep"),  # does not divide dp_shard
        (["model=qwen3_moe_debug", "parallel=fsdp_ep", "model.moe.num_experts=6", "parallel.ep=4"], 4, "parallel.ep"),
        (["parallel=ep"], 2, "parallel.ep"),  # Llama has no experts
    ],
)
def test_impossible_ep_layouts_are_refused(overrides, world, key):
    with pytest.raises(ConfigError) as err:
        validate(compose_typed(*overrides), world_size=world)
    assert err.value.key == key
