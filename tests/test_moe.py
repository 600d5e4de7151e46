"""The MoE layer: routing properties, grouped GEMM vs loop, aux loss, bias balancing, dropless."""

from __future__ import annotations

import pytest
import torch

from titan.models.moe import MoE, MoEArgs, Router, aux_loss, load_metrics


def _moe(**kw) -> MoE:
    args = MoEArgs(**{"num_experts": 8, "top_k": 2, "expert_hidden": 32, **kw})
    torch.manual_seed(0)
    layer = MoE(16, args)
    layer.init_weights(0.2, 0.2, torch.Generator().manual_seed(1))
    return layer


@pytest.mark.parametrize("score, norm", [("softmax", True), ("softmax", False), ("sigmoid", True)])
def test_router_picks_exactly_k_distinct_experts_with_configured_weights(score, norm):
    args = MoEArgs(num_experts=8, top_k=3, score=score, norm_topk=norm, route_scale=2.0)
    router = Router(16, args)
    torch.nn.init.normal_(router.gate.weight)
    ids, weights, scores = router(torch.randn(50, 16))
    assert ids.shape == (50, 3) and all(len(set(row.tolist())) == 3 for row in ids)
    assert torch.equal(ids.sort(-1).values, scores.topk(3, -1).indices.sort(-1).values)  # the k best
    if norm:
        assert torch.allclose(weights.sum(-1), torch.full((50,), 2.0))
    else:
        assert torch.allclose(weights, 2.0 * scores.gather(-1, ids))
    if score == "softmax":
        assert torch.allclose(scores.sum(-1), torch.ones(50))


def test_grouped_mm_and_loop_agree_forward_and_backward():
    x = torch.randn(4, 10, 16)
    outs, grads = [], []
    for grouped in (True, False):
        layer = _moe(grouped_mm=grouped, n_shared_experts=1)
        xi = x.clone().requires_grad_()
        y = layer(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad for p in layer.parameters()])
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_matches_a_per_token_reference():
    layer = _moe(top_k=2)
    x = torch.randn(12, 16)
    ids, weights, _ = layer.router(x)
    e = layer.experts
    ref = torch.stack([
        sum(w * ((torch.nn.functional.silu(x[t] @ e.w1[i].T) * (x[t] @ e.w3[i].T)) @ e.w2[i].T) for i, w in zip(ids[t], weights[t]))
        for t in range(12)
    ])
    assert torch.allclose(layer(x), ref, atol=1e-6)


def test_dropless_when_every_token_picks_the_same_expert():
    layer = _moe(top_k=1, grouped_mm=True)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[5] = 1.0  # positive inputs: expert 5 wins every token
    x = torch.rand(64, 16) + 0.1
    out = layer.train()(x)
    assert layer.tokens_per_expert[5] == 64 and layer.tokens_per_expert.sum() == 64
    e = layer.experts
    full = (torch.nn.functional.silu(x @ e.w1[5].T) * (x @ e.w3[5].T)) @ e.w2[5].T  # no token dropped
    assert torch.allclose(out, full, atol=1e-6)
    assert load_metrics([layer.update_bias()])["moe_load_max_over_mean"] == 8.0


def test_aux_loss_gradient_reaches_the_router():
    layer = _moe(aux_loss_coef=0.1).train()
    layer(torch.randn(32, 16))
    loss = aux_loss(layer)
    assert loss is not None and loss > 0 and aux_loss(layer) is None  # consumed once
    loss.backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0


def test_aux_loss_is_one_at_perfect_balance_like_transformers():
    """Uniform probabilities and a uniform load give E * sum_i (k/E) * (1/E) = k... times 1/k
    per choice in transformers' convention: the loss equals top_k."""
    layer = _moe(aux_loss_coef=1.0, top_k=2).train()
    with torch.no_grad():
        layer.router.gate.weight.zero_()  # all scores equal: topk picks experts 0, 1 for every token
    layer(torch.randn(16, 16))
    # all tokens on experts 0 and 1: f = (1, 1, 0...), P = 1/8 each -> 8 * (1/8 + 1/8) = 2
    assert float(aux_loss(layer)) == pytest.approx(2.0)


def test_bias_update_moves_a_skewed_load_toward_balance():
    layer = _moe(score="sigmoid", bias_update_rate=0.01, top_k=2).train()
    with torch.no_grad():  # a router that prefers experts 0 and 1 for every token
        layer.router.gate.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        layer.router.gate.weight[:2] += 0.5
    x = torch.rand(256, 16)
    imbalance = []
    for _ in range(40):
        layer(x)
        imbalance.append(load_metrics([layer.update_bias()])["moe_load_max_over_mean"])
    assert imbalance[0] > 3.5  # nearly all 512 slots on 2 of 8 experts
    # The sign update oscillates around balance with an amplitude set by the rate.
    assert max(imbalance[-10:]) < 1.6 and layer.router.expert_bias[:2].max() < layer.router.expert_bias[2:].min()
