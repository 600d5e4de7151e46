"""Assemble one rank's training components from the typed config, in the order that matters:

tokenizer -> model on meta -> float8 -> TP -> activation checkpointing -> compile -> FSDP/DDP
-> materialise + init (same weights as one process) -> optimizer, schedule -> data -> state.
"""

from __future__ import annotations

import contextlib
from functools import partial
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from titan.activation_checkpoint import apply_activation_checkpointing
from titan.compile import apply_compile, compile_loss
from titan.config.schema import SFTPacking, Task, TrainConfig
from titan.data import build_data, build_tokenizer
from titan.fault_tolerance import replica_groups
from titan.finetune.lora import apply_lora, trainable_state_keys
from titan.models import LlamaArgs, active_params, build_model, count_params, flops_per_token, model_args
from titan.models import moe
from titan.models.document_mask import document_ids
from titan.optim import build_lr_scheduler, build_optimizer
from titan.parallel import add_replicated, all_reduce_sum, build_parallel
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
    n_active_params: int = 0  # parameters one token uses (MoE: fewer than n_params)
    expert_load: Optional[list] = None  # tokens per expert of the last step, one tensor per MoE layer
    loss: Optional["TokenSumLoss"] = None  # the training loss (its divisor is per step for SFT)
    document_mask: bool = False  # derive document ids from BOS tokens for the model
    masked_labels: bool = False  # task=sft: labels are -100 outside assistant turns

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

    def model_kwargs(self, inputs: torch.Tensor, positions: Optional[torch.Tensor]) -> dict:
        """Keyword arguments of the model's forward beyond the tokens: CP positions, or the
        packed documents' ids (every rank derives them from its copy of the tokens, so later
        pipeline stages get them too)."""
        if self.document_mask:
            return {"document_ids": document_ids(inputs, self.tokenizer.bos_id)}
        return {} if positions is None else {"positions": positions}

    def set_loss_divisor(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """SFT: divide each rank's summed loss by its share (1/loss_divisor) of the trained
        tokens of the whole global batch, all-reduced once per step before any backward, so
        the gradient is that of the global mean over trained tokens on every layout. Counted
        on the full micro-batches (before the context-parallel slice), hence / cp."""
        if not self.masked_labels:
            return
        local = sum(int((labels != -100).sum()) for _, labels in batches)
        count = torch.tensor(float(local), device=self.parallel.device)
        total = float(all_reduce_sum(count, self.parallel.dp_cp_group)) / self.parallel.cp_size
        self.loss.divisor = max(total, 1.0) / self.parallel.loss_divisor

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return self.parallel.clip_grad_norm(self.model.parameters(), max_norm)

    def after_optimizer_step(self) -> None:
        self.precision.after_optimizer_step(self.model)
        # MoE: the aux-loss-free bias update uses the load of the step just taken.
        self.expert_load = [layer.update_bias() for layer in moe.moe_layers(self.model)]

    def with_aux_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to differentiate: the model's auxiliary losses (MoE load balancing) of the
        forward just run are added, as a mean over the micro-batches of a step."""
        aux = moe.aux_loss(self.model)
        return loss if aux is None else add_replicated(loss, aux / self.accum_steps)

    def model_metrics(self) -> dict[str, float]:
        """Model-specific metrics of the last step (MoE: per-expert load)."""
        return moe.load_metrics(self.expert_load or [])

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
    apply_lora(model, cfg.finetune)  # finetune=lora: adapters on the (float8) linears, the rest frozen
    transforms = [
        lambda m: apply_activation_checkpointing(m, cfg.activation_checkpoint),
        lambda m: apply_compile(m, cfg.compile),
    ]
    # Fault-tolerant replica groups take their slices of the global batch like dp ranks.
    groups, group = replica_groups(cfg), cfg.fault_tolerance.group_id if cfg.fault_tolerance.enabled else 0
    tokens_per_rank = t.global_batch_size * t.seq_len // (parallel.loss_divisor * groups)
    loss = TokenSumLoss(tokens_per_rank, compile_loss(token_ce_sum, cfg.compile))
    pipeline = None
    if parallel.pp_enabled:  # this rank's stages of the model, each parallelised like a model
        pipeline = parallel.build_pipeline(model, loss, t.micro_batch_size, t.seq_len, transforms)
        for part in pipeline.model_parts:
            parallel.materialize_and_init(part, env.device, t.seed)
        model = pipeline.rank_model  # one module over the stages: optimizer, DCP, clipping
    else:
        model = parallel.apply(model, before_data_parallel=transforms)
        parallel.materialize_and_init(model, env.device, t.seed)
    model.train()

    optimizer = build_optimizer(model, cfg.optim, cfg.precision, seed=t.seed)  # bf16 states: rounding noise
    scheduler = build_lr_scheduler(optimizer, cfg.lr_schedule, t.steps)
    dp_rank, dp_world = group * parallel.dp_world + parallel.dp_rank, groups * parallel.dp_world
    sft = cfg.task.name is Task.sft
    if sft:
        loader, val_factory = build_sft_components(cfg, tokenizer, parallel)
    else:
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
        state=TrainState(model, optimizer, scheduler, loader, model_keys=trainable_state_keys(model)),
        parallel=parallel,
        precision=precision,
        n_params=n_params,
        flops_per_token=flops_per_token(args, n_params, t.seq_len),
        accum_steps=accum_steps,
        tokens_per_rank=tokens_per_rank,
        pipeline=pipeline,
        n_active_params=active_params(args, n_params),
        loss=loss,
        document_mask=cfg.data.document_mask or (sft and cfg.data.sft_packing is SFTPacking.pack),
        masked_labels=sft,
    )
    if pipeline is not None:
        pipeline.loss_context = components.forward_context  # loss parallel + autocast per schedule step
        if sft:  # validation sums the CE over trained tokens and divides by their count
            pipeline.eval_loss_fn = partial(summed_ce, divisor=1)
    return components


def build_sft_components(cfg: TrainConfig, tokenizer: Any, parallel: Any):
    """task=sft: conversation loaders (titan/data/sft.py) with the configured chat template.
    Padded micro-batches are a multiple of what the sequence layout needs (tp for sequence
    parallel, 2 x cp for load-balanced chunks), and of full length under pp (static shapes)."""
    from titan.data.chat import build_chat_template
    from titan.data.sft import build_sft_data

    t, d = cfg.training, parallel.degrees
    template = build_chat_template(cfg.data.chat_template, cfg.tokenizer.path)
    return build_sft_data(
        cfg.data, tokenizer, template, t.seq_len, t.global_batch_size, t.micro_batch_size,
        parallel.dp_rank, parallel.dp_world, t.seed,
        pad_multiple=d["tp"] * 2 * d["cp"], fixed_width=parallel.pp_enabled,
    )


def token_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the tokens (labels -100 ignored), in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")


def summed_ce(logits: torch.Tensor, labels: torch.Tensor, divisor: int) -> torch.Tensor:
    """Token-summed cross-entropy over this rank's share of the global batch, divided by the
    tokens it holds. Every rank holds the same number of tokens, so the data-parallel gradient
    average equals the gradient of the global-batch mean, whatever the layout."""
    return token_ce_sum(logits, labels) / divisor


class TokenSumLoss:
    """`summed_ce` with a divisor the trainer may set per step: fixed at the rank's token count
    for pretraining; for SFT, the rank's share of the trained (label != -100) tokens of the
    whole global batch, counted before the backward passes."""

    def __init__(self, divisor: float, ce_sum: Callable = token_ce_sum):
        self.divisor = divisor
        self.ce_sum = ce_sum  # compiled with compile.loss; the divisor stays outside the graph

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.ce_sum(logits, labels) / self.divisor
