"""Expert parallelism composed with tensor and pipeline parallelism, trained by the real
Trainer (tests/parallel_harness.py) in fp32 on 4 gloo ranks: losses, gradient norms and the
final weights equal the single process's. Shared experts and both balancing methods on (the
aux loss only without pp: pipeline schedules do not carry it)."""

from __future__ import annotations

import pytest

from tests.parallel_harness import FINAL_ATOL, GRAD_NORM_RTOL, LOSS_RTOL, run_reference, run_world

MOE = [
    "model=qwen3_moe_debug", "model.dim=64", "model.n_layers=2", "model.head_dim=16", "model.moe.expert_hidden=32",
    "model.moe.n_shared_experts=1", "model.moe.bias_update_rate=0.01", "optim=sgd", "optim.lr=0.1", "training.steps=3",
]
NO_AUX = ["model.moe.aux_loss_coef=0"]


def _assert_matches(got: dict, ref: dict) -> None:
    assert "error" not in got, got.get("error")
    assert got["losses"] == pytest.approx(ref["losses"], rel=LOSS_RTOL)
    assert got["grad_norms"] == pytest.approx(ref["grad_norms"], rel=GRAD_NORM_RTOL)
    assert got["final"].keys() == ref["final"].keys()
    for name, value in ref["final"].items():
        assert (got["final"][name] - value).abs().max() < FINAL_ATOL, name


@pytest.mark.slow
def test_ep_x_tp_and_ep_x_pp_match_single_process():
    got = run_world(4, [("ep_tp", [*MOE, "parallel=ep_tp"]), ("ep_pp", [*MOE, *NO_AUX, "parallel=ep_pp"])])
    assert got["ep_tp"]["degrees"] == dict(pp=1, dp_replicate=1, dp_shard=2, cp=1, tp=2)
    _assert_matches(got["ep_tp"], run_reference(MOE))
    assert got["ep_pp"]["degrees"]["pp"] == 2 and got["ep_pp"]["has_first_last"] == (True, False)
    _assert_matches(got["ep_pp"], run_reference([*MOE, *NO_AUX]))
