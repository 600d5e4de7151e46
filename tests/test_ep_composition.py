"""Expert parallelism composed with FSDP, HSDP, tensor and pipeline parallelism, trained by the real
Trainer (tests/parallel_harness.py) in fp32 on 4 gloo ranks: losses, gradient norms and the
final weights equal the single process's, and the planner's parameter bytes per rank equal
what rank 0 really holds (so fsdp_ep's experts are FSDP-sharded over the ranks that hold the
same experts, not replicated). Shared experts and both balancing methods on (the aux loss only
without pp: pipeline schedules do not carry it)."""

from __future__ import annotations

import pytest

from tests.parallel_harness import FINAL_ATOL, GRAD_NORM_RTOL, LOSS_RTOL, run_reference, run_world, train_config
from titan.plan import plan

MOE = [
    "model=qwen3_moe_debug", "model.dim=64", "model.n_layers=2", "model.head_dim=16", "model.moe.expert_hidden=32",
    "model.moe.n_shared_experts=1", "model.moe.bias_update_rate=0.01", "optim=sgd", "optim.lr=0.1", "training.steps=3",
]
NO_AUX = ["model.moe.aux_loss_coef=0"]
LAYOUTS = {
    "fsdp_ep": [*MOE, "parallel=fsdp_ep"],  # dp_shard=4 = 2 expert replicas x ep=2: experts FSDP over the replicas
    # dp_replicate=2 x (dp_shard = ep = 2): experts outside FSDP, their gradients all-reduced over the replicas
    "hsdp_ep": [*MOE, "parallel=hsdp", "parallel.ep=2"],
    "ep_tp": [*MOE, "parallel=ep_tp"],
    "ep_pp": [*MOE, *NO_AUX, "parallel=ep_pp"],
}


def _assert_matches(got: dict, ref: dict) -> None:
    assert "error" not in got, got.get("error")
    assert got["losses"] == pytest.approx(ref["losses"], rel=LOSS_RTOL)
    assert got["grad_norms"] == pytest.approx(ref["grad_norms"], rel=GRAD_NORM_RTOL)
    assert got["final"].keys() == ref["final"].keys()
    for name, value in ref["final"].items():
        # Against the size of the update too: expert updates are tiny (a few tokens each), so
        # an absolute tolerance alone would miss a wrong expert gradient.
        update = (value - ref["init"][name]).abs().max()
        assert (got["final"][name] - value).abs().max() < min(FINAL_ATOL, 1e-6 + 1e-2 * update), name


@pytest.mark.slow
def test_ep_with_fsdp_hsdp_tp_pp_matches_single_process_and_the_planner():
    got = run_world(4, list(LAYOUTS.items()))
    assert got["ep_tp"]["degrees"] == dict(pp=1, dp_replicate=1, dp_shard=2, cp=1, tp=2)
    assert got["ep_pp"]["degrees"]["pp"] == 2 and got["ep_pp"]["has_first_last"] == (True, False)
    with_aux, no_aux = run_reference(MOE), run_reference([*MOE, *NO_AUX])
    for name, overrides in LAYOUTS.items():
        _assert_matches(got[name], no_aux if name == "ep_pp" else with_aux)
        planned = plan(train_config(overrides, 4), world_size=4).ranks[0].params  # pp rank 0
        assert got[name]["local_param_bytes"] == planned, name
    # 2 MoE layers x 3 routed weights of 8 experts x 32 x 64 (fp32): rank 0 holds 1/4 of them under fsdp_ep
    # (ep=2 x 2-way FSDP), 1/2 under ep_tp (dp_shard = ep: nothing left to shard them over).
    experts = 2 * 3 * 8 * 32 * 64 * 4
    single = plan(train_config([*MOE], 1), world_size=1).ranks[0].params
    assert got["fsdp_ep"]["local_param_bytes"] == pytest.approx((single - experts) / 4 + experts / 4)
