"""Mixture-of-experts feed-forward: token-choice top-k router, SwiGLU experts, shared experts.

Dropless: every token reaches its k experts whatever the load (no capacity factor). Tokens are
sorted by expert and each expert multiplies one contiguous run of rows, either with one
`torch._grouped_mm` per projection or with a loop over experts (`MoEArgs.grouped_mm`); the two
give the same numbers.

Load balancing, both optional:
- an auxiliary loss (Switch Transformer / Qwen3-MoE): E * sum_i f_i * P_i, f_i the fraction of
  tokens that chose expert i (summing to k), P_i the mean router probability of expert i. It is kept
  on the module (`aux_loss`) for the trainer to add to its loss;
- DeepSeek-V3's auxiliary-loss-free update: a per-expert bias added to the scores for the
  *selection* only (the weights stay bias-free), moved after every optimizer step by
  `bias_update_rate * sign(mean load - load)` (`update_bias`).

Plain PyTorch: expert parallelism replaces `MoE.experts` from outside (titan/parallel/expert.py)
and may set `MoE.reduce_counts` so that loads are counted over all data-parallel ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MoEArgs:
    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 64
    n_shared_experts: int = 0
    score: str = "softmax"  # or "sigmoid"
    norm_topk: bool = True
    route_scale: float = 1.0
    aux_loss_coef: float = 0.0
    bias_update_rate: float = 0.0
    n_dense_layers: int = 0
    grouped_mm: bool = True


def _trunc_normal(weight: torch.Tensor, std: float, generator: Optional[torch.Generator]) -> None:
    nn.init.trunc_normal_(weight, std=std, a=-3 * std, b=3 * std, generator=generator)


class Router(nn.Module):
    """Scores every expert per token and picks the top k."""

    def __init__(self, dim: int, args: MoEArgs):
        super().__init__()
        self.args = args
        self.gate = nn.Linear(dim, args.num_experts, bias=False)
        # Selection bias of the aux-loss-free balancing: state (checkpointed), not a parameter.
        self.register_buffer("expert_bias", torch.zeros(args.num_experts), persistent=args.bias_update_rate > 0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (tokens, dim) -> (expert ids (tokens, k), weights (tokens, k), scores (tokens, E))."""
        logits = self.gate(x).float()
        scores = logits.softmax(-1) if self.args.score == "softmax" else logits.sigmoid()
        select = scores + self.expert_bias if self.args.bias_update_rate > 0 else scores
        ids = select.topk(self.args.top_k, dim=-1).indices
        weights = scores.gather(-1, ids)
        if self.args.norm_topk:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * self.args.route_scale, scores


def grouped_swiglu(x: torch.Tensor, counts: torch.Tensor, w1, w2, w3, grouped_mm: bool) -> torch.Tensor:
    """SwiGLU of each expert over its contiguous run of rows of `x` (rows sorted by expert,
    `counts` rows per expert). w1, w3: (E, hidden, dim); w2: (E, dim, hidden)."""
    if grouped_mm:
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        h = F.silu(torch._grouped_mm(x, w1.transpose(-2, -1), offs=offs)) * torch._grouped_mm(x, w3.transpose(-2, -1), offs=offs)
        return torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)
    outs = []
    for e, rows in enumerate(torch.split(x, counts.tolist())):
        outs.append((F.silu(rows @ w1[e].T) * (rows @ w3[e].T)) @ w2[e].T)
    return torch.cat(outs) if outs else x.new_zeros(0, w2.shape[1])


class GroupedExperts(nn.Module):
    """The routed experts' weights stacked on a leading expert dim (shardable on it for EP)."""

    def __init__(self, dim: int, hidden: int, num_experts: int, grouped_mm: bool = True):
        super().__init__()
        self.grouped_mm = grouped_mm
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, dim))  # gate
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden, dim))  # up
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden))  # down

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # Under expert parallelism the weights are sharded DTensors: compute on this rank's experts.
        w1, w2, w3 = (w.to_local() if hasattr(w, "to_local") else w for w in (self.w1, self.w2, self.w3))
        return grouped_swiglu(x, counts, w1, w2, w3, self.grouped_mm)

    def init_weights(self, std: float, out_std: float, generator: Optional[torch.Generator] = None) -> None:
        _trunc_normal(self.w1, std, generator)
        _trunc_normal(self.w3, out_std, generator)
        _trunc_normal(self.w2, out_std, generator)


class MoE(nn.Module):
    """Drop-in for a block's `feed_forward`: (batch, seq, dim) -> (batch, seq, dim)."""

    def __init__(self, dim: int, args: MoEArgs):
        super().__init__()
        from titan.models.llama3 import FeedForward

        self.args = args
        self.router = Router(dim, args)
        self.experts = GroupedExperts(dim, args.expert_hidden, args.num_experts, args.grouped_mm)
        self.shared = FeedForward(dim, args.expert_hidden * args.n_shared_experts) if args.n_shared_experts else None
        # Routed slots per expert since the last `update_bias` (training forwards only).
        self.register_buffer("tokens_per_expert", torch.zeros(args.num_experts), persistent=False)
        self.aux_loss: Optional[torch.Tensor] = None  # of the last training forward
        # Set by the parallel layer: sums a count tensor over the data-parallel ranks.
        self.reduce_counts: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        ids, weights, scores = self.router(x)
        flat_ids = ids.flatten()
        counts = torch.bincount(flat_ids, minlength=self.args.num_experts)
        # Sort the (token, slot) pairs by expert: each expert then sees one contiguous run.
        order = flat_ids.argsort(stable=True)
        token_of_slot = order // self.args.top_k
        routed = self.experts(x[token_of_slot], counts)
        routed = routed * weights.flatten()[order].unsqueeze(-1).to(routed.dtype)
        out = torch.zeros_like(x).index_add_(0, token_of_slot, routed.to(x.dtype))
        if self.shared is not None:
            out = out + self.shared(x)
        if self.training:
            self._account(counts, scores)
        return out.reshape(shape)

    def _account(self, counts: torch.Tensor, scores: torch.Tensor) -> None:
        """Record the load of this forward (over all data-parallel ranks) and its aux loss."""
        counts = counts.float()
        if self.reduce_counts is not None:
            counts = self.reduce_counts(counts)
        with torch.no_grad():
            self.tokens_per_expert += counts
        if self.args.aux_loss_coef > 0:
            # f_i: tokens sent to expert i per token (sums to k), global when counts are reduced;
            # the same scale as transformers' load_balancing_loss_func.
            share = counts * self.args.top_k / counts.sum()
            probs = scores / scores.sum(-1, keepdim=True)  # sigmoid scores normalised per token
            self.aux_loss = self.args.aux_loss_coef * self.args.num_experts * (share * probs.mean(0)).sum()

    @torch.no_grad()
    def update_bias(self) -> torch.Tensor:
        """After an optimizer step: nudge the selection bias toward a balanced load; reset and
        return the load counted since the last call."""
        load = self.tokens_per_expert.clone()
        if self.args.bias_update_rate > 0 and load.sum() > 0:
            self.router.expert_bias += self.args.bias_update_rate * torch.sign(load.mean() - load)
        self.tokens_per_expert.zero_()
        return load

    def init_weights(self, std: float, out_std: float, generator: Optional[torch.Generator] = None) -> None:
        _trunc_normal(self.router.gate.weight, std, generator)
        self.experts.init_weights(std, out_std, generator)
        if self.shared is not None:
            self.shared.init_weights(std, out_std, generator)
        self.router.expert_bias.zero_()
        self.tokens_per_expert.zero_()


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def aux_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """Sum of the MoE layers' aux losses from the last training forward (None: none)."""
    losses = [m.aux_loss for m in moe_layers(model) if m.aux_loss is not None]
    for m in moe_layers(model):
        m.aux_loss = None  # consumed: a later forward records its own
    return sum(losses) if losses else None


def load_metrics(loads: list[torch.Tensor]) -> dict[str, float]:
    """Per-expert load of one step over all MoE layers: imbalance = max / mean tokens per expert."""
    if not loads:
        return {}
    stacked = torch.stack([l.float().cpu() for l in loads])
    mean = stacked.mean(-1).clamp_min(1e-9)
    imbalance = stacked.max(-1).values / mean
    return {
        "moe_load_max_over_mean": float(imbalance.max()),
        "moe_load_max_over_mean_avg": float(imbalance.mean()),
        "moe_tokens_per_expert_min": float(stacked.min()),
        "moe_tokens_per_expert_max": float(stacked.max()),
    }
