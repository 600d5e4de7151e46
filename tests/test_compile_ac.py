"""Activation checkpointing and torch.compile change memory and speed, never the numbers."""

from __future__ import annotations

import os
import tempfile

# A stable inductor cache: a cold compile is ~20 s per graph on a small CPU, a warm one ~2 s.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "titan-test-inductor"))

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from titan.activation_checkpoint import SAVE_OPS, apply_activation_checkpointing
from titan.compile import apply_compile, compile_loss
from titan.config.errors import ConfigError
from titan.config.schema import ACMode, ActivationCheckpointConfig, CompileConfig, CompileMode
from titan.models.llama3 import Llama3, LlamaArgs

ARGS = LlamaArgs(dim=64, n_layers=2, n_heads=4, vocab_size=128, multiple_of=32, max_seq_len=32)
WRAPPED = "CheckpointWrapper"


def tiny_model() -> Llama3:
    torch.manual_seed(0)
    model = Llama3(ARGS)
    model.init_weights()
    return model


def tokens() -> torch.Tensor:
    return torch.randint(0, ARGS.vocab_size, (4, 33), generator=torch.Generator().manual_seed(1))


def loss_and_grads(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    t = tokens()
    loss = F.cross_entropy(model(t[:, :-1]).flatten(0, 1), t[:, 1:].flatten())
    loss.backward()
    # state_dict names (clean) for the grads, so wrapped and plain models compare key by key
    names = {id(p): n for n, p in model.state_dict(keep_vars=True).items()}
    return loss.detach(), {names[id(p)]: p.grad for p in model.parameters()}


@pytest.fixture(scope="module")
def reference():
    model = tiny_model()
    loss, grads = loss_and_grads(model)
    return loss, grads, list(model.state_dict())


@pytest.mark.parametrize(
    "mode, wrapped",
    [(ACMode.full, ["0", "1"]), (ACMode.selective_layer, ["0"]), (ACMode.selective_op, ["0", "1"])],
)
def test_activation_checkpointing_is_exact(mode, wrapped, reference):
    ref_loss, ref_grads, ref_keys = reference
    model = apply_activation_checkpointing(tiny_model(), ActivationCheckpointConfig(mode=mode, every=2))
    assert [k for k, b in model.layers.items() if type(b).__name__ == WRAPPED] == wrapped
    assert list(model.state_dict()) == ref_keys  # the wrapper prefix never reaches checkpoints
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters())
    loss, grads = loss_and_grads(model)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_selective_op_policy_saves_the_matmuls_of_both_devices():
    names = {str(op) for op in SAVE_OPS}
    for op in ("mm", "addmm", "bmm", "_scaled_mm", "_scaled_dot_product_flash_attention_for_cpu",
               "_scaled_dot_product_flash_attention"):
        assert f"aten.{op}.default" in names


def test_selective_op_recomputes_only_the_cheap_ops():
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.counts[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    def backward_ops(mode: ACMode) -> Counter:
        model = apply_activation_checkpointing(tiny_model(), ActivationCheckpointConfig(mode=mode))
        t = tokens()
        loss = F.cross_entropy(model(t[:, :-1]).flatten(0, 1), t[:, 1:].flatten())
        with CountOps() as counter:
            loss.backward()
        return counter.counts

    plain, sac, full = (backward_ops(m) for m in (ACMode.none, ACMode.selective_op, ACMode.full))
    assert sac["mm"] == plain["mm"] < full["mm"]  # matmuls saved, not rerun
    sdpa = "_scaled_dot_product_flash_attention_for_cpu"
    assert sac[sdpa] == plain[sdpa] == 0 < full[sdpa]
    assert plain["silu"] == 0 < sac["silu"]  # the cheap ops are recomputed


def test_off_modes_change_nothing_and_bad_every_is_refused():
    model = tiny_model()
    assert apply_activation_checkpointing(model, ActivationCheckpointConfig()) is model
    assert apply_compile(model, CompileConfig()) is model
    assert all(type(b).__name__ == "TransformerBlock" for b in model.layers.values())
    assert compile_loss(F.cross_entropy, CompileConfig(mode=CompileMode.model)) is F.cross_entropy  # loss=false
    with pytest.raises(ConfigError, match="every"):
        apply_activation_checkpointing(model, ActivationCheckpointConfig(mode=ACMode.selective_layer, every=0))


def test_compile_block_matches_eager_with_one_graph(reference):
    ref_loss, ref_grads, ref_keys = reference
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = apply_compile(tiny_model(), CompileConfig(mode=CompileMode.block))
    assert list(model.state_dict()) == ref_keys  # in-place compile: no `_orig_mod.` prefix
    loss, grads = loss_and_grads(model)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # both blocks share it
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
