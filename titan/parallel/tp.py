"""Tensor (+ sequence) parallelism for Llama3 with DTensor `parallelize_module` plans.

Per block: wq/wk/wv/w1/w3 column-wise (each rank owns a slice of the heads / hidden units),
wo/w2 row-wise (partial sums reduced on the way out). With sequence parallelism the norms
and residual stream between the matmul regions are sharded on the sequence dim (Shard(1)),
so the all-reduce after wo/w2 becomes a reduce-scatter and the gather happens before
attention / feed-forward. The embedding is vocab-parallel (row-wise); the output projection
is column-wise and keeps vocab-sharded logits (Shard(-1)) for `loss_parallel`.

LoRA adapters (`titan.finetune.lora`, a `lora` child of a target linear) follow their linear's
plan: under a column-wise linear `a` is replicated and `b` sharded on its output rows, so the
adapter's output is sharded like the linear's; under a row-wise one `a` is sharded on its input
columns (the input arrives sharded) and `b` replicated, so the adapter's output is a partial
sum reduced together with the linear's. Each rank computes its slice of scale * b @ a @ x: the
same math as one process, with no extra collective.
"""

from __future__ import annotations

import contextlib
import sys

from torch import nn
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from titan.config.errors import ConfigError
from titan.models.moe import MoE
from titan.finetune.lora import ADAPTER


def _is_float8_tensorwise(module: nn.Module) -> bool:
    """torchao's float8 TP styles cast before the all-gather; they assume tensorwise scales.
    Rowwise-scaled Float8Linear modules take the plain styles."""
    if "torchao" not in sys.modules:  # nothing can be a Float8Linear; skip the slow import
        return False
    from torchao.float8.config import ScalingGranularity
    from torchao.float8.float8_linear import Float8Linear

    return (
        isinstance(module, Float8Linear)
        and module.config.cast_config_input.scaling_granularity is ScalingGranularity.TENSORWISE
    )


def _styles(*linears: nn.Module, float8_collectives: bool = True):
    """(colwise, rowwise, prepare_input) classes: float8 ones when every linear is float8 and
    the backend can move float8 tensors (gloo cannot: "Invalid scalar type"), else plain ones
    (a Float8Linear then casts after the high-precision all-gather), also when a linear carries
    a LoRA adapter."""
    # A LoRA adapter reads its linear's input: it must stay high precision (plain styles).
    adapted = any(ADAPTER in m._modules for m in linears)
    if float8_collectives and linears and not adapted and all(_is_float8_tensorwise(m) for m in linears):
        from torchao.float8.float8_tensor_parallel import (
            Float8ColwiseParallel,
            Float8RowwiseParallel,
            PrepareFloat8ModuleInput,
        )

        return Float8ColwiseParallel, Float8RowwiseParallel, PrepareFloat8ModuleInput
    return ColwiseParallel, RowwiseParallel, PrepareModuleInput


def _check_divisible(model: nn.Module, tp: int) -> None:
    a = model.args
    checks = [("model.n_heads", a.n_heads), ("model.n_kv_heads", a.kv_heads), ("model.vocab_size", a.vocab_size)]
    ffns = [block.feed_forward for block in model.layers.values()]
    if any(not isinstance(f, MoE) for f in ffns):
        checks.append(("model.ffn_hidden" if getattr(a, "intermediate_size", None) else "model.multiple_of", a.ffn_hidden))
    if any(isinstance(f, MoE) and f.shared is not None for f in ffns):
        moe = a.moe
        checks.append(("model.moe.expert_hidden", moe.expert_hidden * moe.n_shared_experts))
    for key, value in checks:
        if value % tp:
            raise ConfigError(key, f"{value} is not divisible by parallel.tp={tp}")


def _moe_plan(moe: MoE, stream) -> dict:
    """A MoE feed-forward under TP: the router and the routed experts run on the whole
    (gathered) sequence on every tp rank, the experts sharded by expert parallelism (over the
    ranks of the same tp index), not by TP; only the shared experts are split column/row-wise.
    Every tp rank thus routes the same tokens alike (the single-process numbers), the router's
    gradient is whole on each, and the output is the replicated sum cut back to `stream`."""
    plan = {
        "feed_forward": PrepareModuleInputOutput(
            input_layouts=(stream,),
            desired_input_layouts=(Replicate(),),
            use_local_input=True,
            output_layouts=(Replicate(),),
            desired_output_layouts=(stream,),
            use_local_output=True,
        )
    }
    if moe.shared is not None:  # a plain input: its gradient is summed over tp on the way back
        plan.update(
            {
                "feed_forward.shared.w1": ColwiseParallel(),
                "feed_forward.shared.w3": ColwiseParallel(),
                "feed_forward.shared.w2": RowwiseParallel(output_layouts=Replicate()),
            }
        )
    return plan


def _block_plan(block: nn.Module, sp: bool, float8_collectives: bool) -> dict:
    attn, ffn = block.attention, block.feed_forward
    moe = isinstance(ffn, MoE)
    linears = (attn.wq, attn.wk, attn.wv, attn.wo) + (() if moe else (ffn.w1, ffn.w2, ffn.w3))
    col, row, prepare = _styles(*linears, float8_collectives=float8_collectives)
    stream = Shard(1) if sp else Replicate()  # layout of the residual stream between blocks
    plan = {
        "attention.wq": col(),
        "attention.wk": col(),
        "attention.wv": col(),
        "attention.wo": row(output_layouts=stream),
    }
    for norm in ("q_norm", "k_norm"):  # QK-norm (Qwen3) over this rank's heads: (batch, seq, heads, head_dim)
        if hasattr(attn, norm):
            plan[f"attention.{norm}"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    if moe:
        plan.update(_moe_plan(ffn, stream))
    else:
        plan.update({"feed_forward.w1": col(), "feed_forward.w3": col(), "feed_forward.w2": row(output_layouts=stream)})
    if sp:
        plan.update({"attention_norm": SequenceParallel(), "ffn_norm": SequenceParallel()})
        # Gather the sequence once per region; the RoPE table (2nd input) is left alone.
        plan["attention"] = prepare(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None))
        if not moe:
            plan["feed_forward"] = prepare(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    return plan


def _adapter_placements(style) -> tuple:
    """(placement of `a`, placement of `b`) of a LoRA adapter on a linear with this TP style."""
    if isinstance(style, ColwiseParallel):
        return Replicate(), Shard(0)
    if isinstance(style, RowwiseParallel):
        return Shard(1), Replicate()
    raise ConfigError("finetune.target_modules", f"no tensor-parallel plan for an adapter on a {type(style).__name__} module")


def _parallelize(module: nn.Module, tp_mesh, plan: dict) -> None:
    """`parallelize_module`, with any LoRA adapter of a planned linear lifted off first (the
    styles would shard or replicate every parameter below the linear) and sharded after to
    match its linear's style. The adapter's forward hook stays on the linear, registered
    before the style's output hook, so it adds to the linear's output while that is still a
    DTensor. Frozen parameters stay frozen (SequenceParallel re-creates the norms' weights
    as trainable)."""
    frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
    lifted = {}
    for path in plan:
        target = module.get_submodule(path)
        if isinstance(target, nn.Linear) and ADAPTER in target._modules:
            lifted[path] = target._modules.pop(ADAPTER)
    parallelize_module(module, tp_mesh, plan)
    for path, adapter in lifted.items():
        for name, placement in zip(("a", "b"), _adapter_placements(plan[path])):
            param = getattr(adapter, name)
            sharded = distribute_tensor(param.data, tp_mesh, [placement], src_data_rank=None)
            adapter.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        module.get_submodule(path).add_module(ADAPTER, adapter)
    for name, param in module.named_parameters():
        if name in frozen:
            param.requires_grad_(False)


def apply_tp(model: nn.Module, tp_mesh, sequence_parallel: bool = True, loss_parallel: bool = True, async_tp: bool = False) -> nn.Module:
    """Shard `model` (a Llama3, possibly a pipeline stage of one) over `tp_mesh`, in place.

    With `loss_parallel` the logits are a vocab-sharded DTensor: compute the loss (and call
    backward) inside `loss_parallel_context(True)`. Otherwise they are plain, full tensors."""
    _check_divisible(model, tp_mesh.size())
    sp = sequence_parallel
    stream = Shard(1) if sp else Replicate()
    float8_collectives = tp_mesh.device_type != "cpu"
    root_plan = {}
    if model.tok_embeddings is not None:
        root_plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=stream)
    if model.norm is not None and sp:
        root_plan["norm"] = SequenceParallel()
    if model.output is not None:
        col, _, _ = _styles(model.output, float8_collectives=float8_collectives)
        root_plan["output"] = col(
            input_layouts=stream,
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
    _parallelize(model, tp_mesh, root_plan)
    if model.args.tie_embeddings and model.output is not None and model.tok_embeddings is not None:
        # Both weights are (vocab, dim) sharded on vocab; parallelize_module replaced them
        # with separate parameters, so tie them again.
        model.output.weight = model.tok_embeddings.weight
    for block in model.layers.values():
        _parallelize(block, tp_mesh, _block_plan(block, sp, float8_collectives))
    if sp and model.tok_embeddings is not None:
        # Compiled blocks fail in backward when their first input is the embedding's own
        # output under SP (measured, torch 2.13); a clone in between avoids it.
        model.tok_embeddings.register_forward_hook(lambda mod, args, out: out.clone())
    if async_tp:
        enable_async_tp(tp_mesh)
    return model


def enable_async_tp(tp_mesh) -> None:
    """Let torch.compile overlap TP collectives with matmuls (symmetric memory, CUDA only)."""
    if tp_mesh.device_type != "cuda":
        raise ConfigError("parallel.async_tp", "async TP needs CUDA + NCCL (symmetric memory); set parallel.async_tp=false on CPU")
    import torch._inductor.config
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    torch._inductor.config._micro_pipeline_tp = True
    enable_symm_mem_for_group(tp_mesh.get_group().group_name)


def loss_parallel_context(enabled: bool):
    """Context for the loss *and its backward* when logits are vocab-sharded DTensors."""
    if not enabled:
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()
