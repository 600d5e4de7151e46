"""LoRA (finetune=lora): adapters from outside the model, frozen base, merged export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from titan.config.errors import ConfigError
from titan.config.schema import FinetuneConfig, FinetuneMethod, OptimConfig
from titan.finetune.lora import adapted_linears, apply_lora, merge_lora, trainable_state_keys
from titan.models.llama3 import Llama3, LlamaArgs
from titan.optim import build_optimizer
from titan.parallel import materialize_and_init

ARGS = LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, max_seq_len=16)
LORA = FinetuneConfig(method=FinetuneMethod.lora, rank=4, alpha=8.0, target_modules=["wq", "wv", "w2", "output"])


def _lora_model(cfg: FinetuneConfig = LORA) -> Llama3:
    with torch.device("meta"):
        model = Llama3(ARGS)
    apply_lora(model, cfg)
    materialize_and_init(model, torch.device("cpu"), seed=7)
    return model


def _tokens() -> torch.Tensor:
    return torch.randint(0, ARGS.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))


def test_starts_as_the_base_model_with_adapters_in_place() -> None:
    model = _lora_model()
    with torch.device("meta"):
        base = Llama3(ARGS)
    materialize_and_init(base, torch.device("cpu"), seed=7)
    tokens = _tokens()[:, :-1]
    torch.testing.assert_close(model(tokens), base(tokens), rtol=0, atol=0)  # b = 0 at init
    names = {n for n, _ in adapted_linears(model)}
    assert "layers.0.attention.wq" in names and "output" in names and "layers.1.feed_forward.w2" in names
    assert all(torch.count_nonzero(m.lora.a) > 0 for _, m in adapted_linears(model))


def test_only_adapters_get_gradients_and_optimizer_state() -> None:
    model = _lora_model()
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    tokens = _tokens()
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        is_adapter = ".lora." in name
        assert p.requires_grad == is_adapter, name
        assert (p.grad is not None) == is_adapter, name
    held = {id(p) for p in opt.state}
    params = dict(model.named_parameters())
    assert held == {id(p) for n, p in params.items() if ".lora." in n}
    assert trainable_state_keys(model) == {k for k in model.state_dict() if ".lora." in k}


def test_merged_weights_give_the_same_logits() -> None:
    model = _lora_model()
    with torch.no_grad():
        for _, linear in adapted_linears(model):
            linear.lora.b.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
    tokens = _tokens()[:, :-1]
    expected = model(tokens)
    merged = merge_lora(model.state_dict())
    assert not any(".lora." in k for k in merged)
    plain = Llama3(ARGS)
    plain.load_state_dict(merged, strict=False)  # rope is a non-persistent buffer
    plain.init_buffers()
    got = plain(tokens)
    assert not torch.allclose(got, Llama3.forward(_lora_model(), tokens), atol=1e-4)  # adapters matter
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_unknown_target_module_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="finetune.target_modules"):
        _lora_model(FinetuneConfig(method=FinetuneMethod.lora, target_modules=["q_proj"]))


def test_lora_with_context_parallel_is_refused_at_validation() -> None:
    from tests.test_config import compose_typed
    from titan.config.validate import validate

    cfg = compose_typed("finetune=lora", "parallel=cp")
    with pytest.raises(ConfigError, match="parallel.cp"):
        validate(cfg, world_size=2)


def _checkpoint_keys(step_dir) -> set:
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata)


@pytest.mark.slow
def test_lora_fsdp_matches_single_and_resumes_bit_for_bit(tmp_path) -> None:
    """Through the real CLI: LoRA under FSDP reproduces the single-process losses; a run
    stopped at step 2 and resumed gives the uninterrupted losses exactly; checkpoints hold
    the adapters only; the HF export (adapters merged) loads in transformers."""
    from tests.helpers import run_titan

    common = ("finetune=lora", "lr_schedule=constant", "lr_schedule.warmup_steps=0", "optim.lr=1e-2", "training.steps=4")
    ref = run_titan(tmp_path / "single", *common, "checkpoint.export_hf=true").check()
    fsdp = run_titan(tmp_path / "fsdp", *common, "parallel=fsdp").check()
    assert fsdp.losses == pytest.approx(ref.losses, rel=1e-5)
    assert ref.losses[-1] < ref.losses[0]

    part = run_titan(tmp_path / "resumed", *common[:-1], "training.steps=2", "checkpoint.interval=2").check()
    keys = _checkpoint_keys(tmp_path / "resumed" / "checkpoints" / "step-00000002")
    model_keys = {k for k in keys if k.startswith("model.")}
    assert model_keys and all(".lora." in k for k in model_keys)
    resumed = run_titan(tmp_path / "resumed", *common, "checkpoint.interval=2").check()
    assert resumed.losses[:2] == part.losses and resumed.losses == ref.losses

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "single" / "hf")
    assert not any("lora" in n for n, _ in hf.named_parameters())


def test_convert_merges_a_lora_checkpoint_into_its_base(tmp_path) -> None:
    """An adapters-only checkpoint + `--base hf:DIR` -> plain HF weights equal to the merge;
    without a base, one clear error."""
    from titan.interop.dcp_io import save_dcp_model
    from titan.interop.safetensors_io import load_hf, save_hf
    from titan.tools.convert import main

    model = _lora_model()
    with torch.no_grad():
        for _, linear in adapted_linears(model):
            linear.lora.b.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base = {k: v for k, v in state.items() if ".lora." not in k}
    save_hf(tmp_path / "base", base, ARGS)
    save_dcp_model(tmp_path / "adapters", {k: v for k, v in state.items() if ".lora." in k})
    assert main([str(tmp_path / "adapters"), str(tmp_path / "merged"), "--to", "hf", "--base", f"hf:{tmp_path / 'base'}"]) == 0
    got, _ = load_hf(tmp_path / "merged")
    for key, expected in merge_lora(state).items():
        torch.testing.assert_close(got[key], expected, msg=key)
    assert main([str(tmp_path / "adapters"), str(tmp_path / "merged2"), "--to", "hf"]) == 2


@pytest.mark.slow
def test_lora_under_tensor_and_pipeline_parallel_matches_single_and_resumes(tmp_path) -> None:
    """The real Trainer (tests/parallel_harness.py) on 2 gloo ranks: LoRA on every kind of
    linear (column-wise, row-wise, the vocab-sharded output) under tp=2 with sequence
    parallelism and under pp=2 gives the single-process losses and weights; the base weights
    (the norms that SequenceParallel re-creates included) never change; checkpoints hold the
    adapters and their optimizer state only; a tp run stopped at step 2 and resumed is bit for
    bit the uninterrupted one."""
    from parallel_harness import FINAL_ATOL, LOSS_RTOL, run_reference, run_world

    lora = ["finetune=lora", "finetune.target_modules=[wq,wk,wv,wo,w1,w2,w3,output]", "lr_schedule=constant", "lr_schedule.warmup_steps=0"]
    tp = [*lora, "parallel=tp"]
    part = [*tp, "checkpoint.interval=2", "checkpoint.keep_last_k=0", f"run_dir={tmp_path / 'tp'}"]
    ref = run_reference(lora)
    runs = run_world(2, [
        ("tp", tp),
        ("pp", [*lora, "parallel=pp"]),
        ("tp_part", [*part, "training.steps=2"]),
        ("tp_resumed", [*part, "checkpoint.resume=auto"]),
    ])
    for key in ("tp", "pp"):
        got = runs[key]
        assert "error" not in got, got.get("error")
        assert got["losses"] == pytest.approx(ref["losses"], rel=LOSS_RTOL), key
        for name, expected in ref["final"].items():
            torch.testing.assert_close(got["final"][name], expected, atol=FINAL_ATOL, rtol=0, msg=f"{key}: {name}")
            trained = not torch.equal(got["final"][name], got["init"][name])
            assert trained == (".lora.a" in name or ".lora.b" in name), f"{key}: {name}"
    assert runs["tp"]["degrees"]["tp"] == 2 and runs["pp"]["degrees"]["pp"] == 2

    keys = _checkpoint_keys(tmp_path / "tp" / "checkpoints" / "step-00000002")
    model_keys = {k for k in keys if k.startswith("model.")}
    optim_keys = {k for k in keys if k.startswith("optim") and ".state." in k}
    assert model_keys and all(".lora." in k for k in model_keys)
    assert optim_keys and all(".lora." in k for k in optim_keys), sorted(optim_keys)[:3]
    assert "error" not in runs["tp_resumed"], runs["tp_resumed"].get("error")
    assert runs["tp_part"]["losses"] == runs["tp"]["losses"][:2]
    assert runs["tp_resumed"]["losses"] == runs["tp"]["losses"][2:]
