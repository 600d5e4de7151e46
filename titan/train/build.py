"""Assemble one rank's training components from the typed config, in the order that matters:

tokenizer -> model on meta -> float8 -> TP -> activation checkpointing -> compile -> FSDP/DDP
-> materialise + init (same weights as one process) -> optimizer, schedule -> data -> state.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from titan.activation_checkpoint import apply_activation_checkpointing
from titan.compile import apply_compile, compile_loss
from titan.config.schema import TrainConfig
from titan.data import build_data, build_tokenizer
from titan.models import LlamaArgs, build_model, count_params, flops_per_token, model_args
from titan.optim import build_lr_scheduler, build_optimizer
from titan.parallel import build_parallel
from titan.parallel.context_parallel import cp_inputs
from titan.precision import Precision, build_precision
from titan.train.env import RankEnv
from titan.train.state import TrainState


@dataclass
class Components:
    model: nn.Module
    args: LlamaArgs
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any
    val_factory: Optional[Callable[[], Any]]
    state: TrainState
    parallel: Any
    precision: Precision
    n_params: int
    flops_per_token: float
    accum_steps: int
    tokens_per_rank: int
    pipeline: Optional[Any] = None  # titan.parallel.pipeline.Pipeline when parallel.pp > 1
    loss_fn: Optional[Callable] = None  # (logits, labels) -> this rank's loss; compiled with compile.loss

    @contextlib.contextmanager
    def forward_context(self):
        """Loss-parallel (TP) around forward+backward, autocast (bf16 without FSDP) for forward."""
        with self.parallel.loss_context():
            with self.precision.autocast():
                yield

    def local_inputs(self, inputs: torch.Tensor, labels: torch.Tensor):
        """This rank's part of a micro-batch on its device: under context parallelism a
        load-balanced slice of the sequence, with the absolute positions RoPE needs."""
        device = self.parallel.device
        return cp_inputs(inputs.to(device), labels.to(device), self.parallel.cp_rank, self.parallel.cp_size)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return self.parallel.clip_grad_norm(self.model.parameters(), max_norm)

    def after_optimizer_step(self) -> None:
        self.precision.after_optimizer_step(self.model)

    def mean_over_dp(self, value: torch.Tensor) -> float:
        return self.parallel.mean_over_dp(value)

    def val_batches(self, n: int) -> Iterator:
        if self.val_factory is None:
            return
        loader = self.val_factory()  # fresh each time: every evaluation sees the same batches
        for _ in range(n):
            yield loader.next_batch()


def build_components(cfg: TrainConfig, env: RankEnv) -> Components:
    t = cfg.training
    tokenizer = build_tokenizer(cfg.tokenizer)
    args = model_args(cfg.model, tokenizer.vocab_size, t.seq_len)
    model = build_model(args)
    n_params = count_params(model)

    parallel = build_parallel(cfg, env)
    precision = build_precision(cfg, env.device.type, fsdp_enabled=parallel.fsdp_enabled)
    precision.convert(model)  # float8 linears, before TP so TP can use float8-aware plans
    transforms = [
        lambda m: apply_activation_checkpointing(m, cfg.activation_checkpoint),
        lambda m: apply_compile(m, cfg.compile),
    ]
    tokens_per_rank = t.global_batch_size * t.seq_len // parallel.loss_divisor
    loss_fn = partial(compile_loss(summed_ce, cfg.compile), divisor=tokens_per_rank)
    pipeline = None
    if parallel.pp_enabled:  # this rank's stages of the model, each parallelised like a model
        pipeline = parallel.build_pipeline(model, loss_fn, t.micro_batch_size, t.seq_len, transforms)
        for part in pipeline.model_parts:
            parallel.materialize_and_init(part, env.device, t.seed)
        model = pipeline.rank_model  # one module over the stages: optimizer, DCP, clipping
    else:
        model = parallel.apply(model, before_data_parallel=transforms)
        parallel.materialize_and_init(model, env.device, t.seed)
    model.train()

    optimizer = build_optimizer(model, cfg.optim, cfg.precision, seed=t.seed)  # bf16 states: rounding noise
    scheduler = build_lr_scheduler(optimizer, cfg.lr_schedule, t.steps)
    dp_rank, dp_world = parallel.dp_rank, parallel.dp_world
    loader, val_factory = build_data(
        cfg.data, tokenizer, t.seq_len, t.global_batch_size, t.micro_batch_size, dp_rank, dp_world, t.seed
    )
    accum_steps = t.global_batch_size // (t.micro_batch_size * dp_world)
    components = Components(
        model=model,
        args=args,
        tokenizer=tokenizer,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        val_factory=val_factory,
        state=TrainState(model, optimizer, scheduler, loader),
        parallel=parallel,
        precision=precision,
        n_params=n_params,
        flops_per_token=flops_per_token(args, n_params, t.seq_len),
        accum_steps=accum_steps,
        tokens_per_rank=tokens_per_rank,
        pipeline=pipeline,
        loss_fn=loss_fn,
    )
    if pipeline is not None:
        pipeline.loss_context = components.forward_context  # loss parallel + autocast per schedule step
    return components


def summed_ce(logits: torch.Tensor, labels: torch.Tensor, divisor: int) -> torch.Tensor:
    """Token-summed cross-entropy over this rank's share of the global batch, divided by the
    tokens it holds. Every rank holds the same number of tokens, so the data-parallel gradient
    average equals the gradient of the global-batch mean, whatever the layout."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum") / divisor
