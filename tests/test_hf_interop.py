"""Hugging Face interop checked with transformers itself: configs it writes, models it saves and
loads, its tokenizer and generation on titan's export. Tiny random models; nothing downloaded."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from tests.helpers import run_titan
from tests.test_config import compose_typed
from tests.tiny_llama import random_llama, tiny_args
from titan.config.errors import ConfigError
from titan.config.validate import validate
from titan.interop import args_from_hf_config, hf_config, initial_weights, load_hf, save_hf
from titan.interop.errors import ConversionError

# GQA (4 query heads over 2 K/V heads), tied embeddings and Llama 3 RoPE scaling with a short
# original context, so all three frequency bands occur within the test sequence.
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}


def hf_tiny_config(tied: bool = True, **changes) -> transformers.LlamaConfig:
    values = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, vocab_size=128, rms_norm_eps=1e-5, max_position_embeddings=64,
                  tie_word_embeddings=tied, rope_parameters={"rope_theta": 50000.0, **LLAMA3_SCALING})
    values.update(changes)
    return transformers.LlamaConfig(**values)


def random_hf_model(config: transformers.LlamaConfig) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF's init leaves norms at 1 and small weights: make every tensor count
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model


def titan_logits(state_dict, args, ids):
    from titan.models.llama3 import Llama3

    with torch.device("meta"):
        model = Llama3(args)
    model.load_state_dict(state_dict, assign=True)
    model.init_buffers(torch.device("cpu"))
    model.tie_weights()
    with torch.no_grad():
        return model.eval()(ids)


# ---------------------------------------------------------------------------------------------
# HF -> titan: a model saved by transformers 5.x (rope_parameters) imports with the same logits
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_transformers_saved_model_imports_with_the_same_logits(tmp_path, tied):
    model = random_hf_model(hf_tiny_config(tied=tied))
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in written and "rope_scaling" not in written  # the 5.x form
    state_dict, args = load_hf(tmp_path)
    assert (args.rope_theta, args.rope_scaling_factor, args.rope_original_max_seq_len) == (50000.0, 32.0, 16)
    assert args.kv_heads == 2 and args.tie_embeddings == tied and args.context == 64
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = model(ids).logits
    assert theirs.abs().max() > 1
    torch.testing.assert_close(titan_logits(state_dict, args, ids), theirs, atol=2e-5, rtol=1e-5)


def test_titan_export_loads_in_transformers_with_the_same_logits(tmp_path):
    args = tiny_args(tie_embeddings=True, rope_scaling_factor=32.0, rope_original_max_seq_len=16, rope_theta=50000.0)
    model = random_llama(args, seed=2)
    save_hf(tmp_path, model.state_dict(), args)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf.config.rope_parameters["rope_type"] == "llama3" and hf.config.rope_parameters["factor"] == 32.0
    assert hf.config.tie_word_embeddings and hf.config.num_key_value_heads == 2
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Config import: both RoPE forms; refusals
# ---------------------------------------------------------------------------------------------
def test_both_rope_forms_give_the_same_args():
    modern = hf_tiny_config().to_dict()
    legacy = {k: v for k, v in modern.items() if k != "rope_parameters"}
    legacy["rope_theta"] = 50000.0
    legacy["rope_scaling"] = dict(LLAMA3_SCALING)
    a, b = args_from_hf_config(modern), args_from_hf_config(legacy)
    assert a == b and a.rope_theta == 50000.0 and a.rope_scaling_factor == 32.0
    plain = args_from_hf_config(hf_tiny_config(rope_parameters={"rope_type": "default", "rope_theta": 7.0}).to_dict())
    assert plain.rope_theta == 7.0 and plain.rope_scaling_factor is None


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": True}, "attention_bias=True"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"head_dim": 32}, "head_dim=32"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "RoPE type 'yarn'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    ({"rope_theta": 1e6}, "disagrees"),  # both forms present, and they differ
])
def test_numerics_changing_fields_titan_cannot_express_are_refused(change, message):
    config = {**hf_tiny_config().to_dict(), **change}
    with pytest.raises(ConversionError, match=message):
        args_from_hf_config(config)


# ---------------------------------------------------------------------------------------------
# checkpoint.initial_load=hf:PATH compares the configs, not only the shapes
# ---------------------------------------------------------------------------------------------
TINY_MODEL = tiny_args(vocab_size=2048, max_seq_len=32)  # conf/model/llama3_tiny.yaml with the default tokenizer


@pytest.mark.parametrize("change, key", [
    ({"rope_theta": 500000.0}, "model.rope_theta=10000.0 but .* has rope_theta=500000.0"),
    ({"norm_eps": 1e-6}, "model.norm_eps=1e-05 but .* has norm_eps=1e-06"),
    ({"tie_embeddings": True}, "model.tie_embeddings=False but .* has tie_embeddings=True"),
    ({"rope_scaling_factor": 8.0}, "model.rope_scaling_factor=None but .* has rope_scaling_factor=8.0"),
    ({"n_kv_heads": 4}, "model.n_kv_heads=2 but .* has n_kv_heads=4"),
])
def test_initial_load_refuses_a_config_mismatch_naming_both_values(tmp_path, change, key):
    import dataclasses

    args = dataclasses.replace(TINY_MODEL, **change)
    save_hf(tmp_path, random_llama(args).state_dict(), args)
    cfg = compose_typed("model=llama3_tiny", "training.seq_len=32", f"checkpoint.initial_load=hf:{tmp_path}")
    with pytest.raises(ConfigError, match=key) as err:
        validate(cfg, world_size=1)  # before launch
    assert err.value.key.startswith("model.") and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=key):  # and in the worker, where the vocabulary is known
        initial_weights(f"hf:{tmp_path}", TINY_MODEL)


@pytest.mark.slow
def test_initial_load_mismatch_through_the_cli_is_one_line_and_exit_2(tmp_path):
    import dataclasses

    args = dataclasses.replace(TINY_MODEL, rope_theta=500000.0)
    save_hf(tmp_path / "hf", random_llama(args).state_dict(), args)
    run = run_titan(tmp_path / "run", f"checkpoint.initial_load=hf:{tmp_path / 'hf'}")
    assert run.returncode == 2, run.stderr
    assert "config error: model.rope_theta: model.rope_theta=10000.0 but" in run.stderr
    assert "Traceback" not in run.stderr


# ---------------------------------------------------------------------------------------------
# The export is usable by itself: tokenizer, generation config, context, dtype
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_tokenizer():
    from titan.config.schema import TokenizerConfig
    from titan.data import build_tokenizer

    return build_tokenizer(TokenizerConfig())


def test_exported_tokenizer_gives_titans_ids_on_real_text(tmp_path, default_tokenizer):
    from titan.data.embedded import embedded_documents
    from titan.interop.hf_tokenizer import save_hf_tokenizer

    save_hf_tokenizer(default_tokenizer, tmp_path, context=4096)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id) == (default_tokenizer.bos_id, default_tokenizer.eos_id)
    docs = embedded_documents()
    texts = [docs[i][:5000] for i in range(0, len(docs), max(1, len(docs) // 60))]
    texts.append("naïve café 😀\t\n  def f(x):\n    return x ** 12345  # <s> and </s> are text here")
    tokens = 0
    for text in texts:
        ours = default_tokenizer.encode(text)
        # split_special_tokens: "<s>" inside a document is text for titan, so it must be here too.
        assert hf(text, add_special_tokens=False, split_special_tokens=True).input_ids == ours
        tokens += len(ours)
    assert tokens > 50_000
    assert hf("def f").input_ids == [default_tokenizer.bos_id, *default_tokenizer.encode("def f")]
    assert hf.decode(default_tokenizer.encode(texts[-1])) == texts[-1]


def test_exported_tiktoken_tokenizer_gives_titans_ids(tmp_path):
    from tests.test_tokenizer import _write_tiktoken_file
    from titan.data.embedded import embedded_documents
    from titan.data.tiktoken_tokenizer import TiktokenTokenizer
    from titan.interop.hf_tokenizer import save_hf_tokenizer

    merges = (b"th", b"he", b"the", b" t", b" the", b"  ", b"in", b"ing", b"re", b"    ", b"de", b"def", b" def",
              b"\n\n", b"se", b"self", b"on", b"ion", b"12")
    _write_tiktoken_file(tmp_path / "tok.model", merges)
    ours = TiktokenTokenizer(tmp_path / "tok.model")
    save_hf_tokenizer(ours, tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (hf.bos_token, hf.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    assert (hf.bos_token_id, hf.eos_token_id) == (ours.bos_id, ours.eos_id)
    docs = embedded_documents()
    for text in [docs[i][:3000] for i in range(0, len(docs), max(1, len(docs) // 20))] + ["def f(self): 123"]:
        assert hf(text, add_special_tokens=False, split_special_tokens=True).input_ids == ours.encode(text)
    assert hf("the def").input_ids == [ours.bos_id, *ours.encode("the def")]


def test_bf16_export_loads_in_transformers(tmp_path, default_tokenizer):
    from titan.train.weights import export_hf

    args = tiny_args(vocab_size=2048, context_len=4096)
    model = random_llama(args)
    out = export_hf(model, args, str(tmp_path), default_tokenizer, "bfloat16")
    config = json.loads((out / "config.json").read_text())
    assert config["max_position_embeddings"] == 4096 and config["dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16
    ids = torch.randint(0, 2048, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits.float(), model(ids), atol=0.15, rtol=0.05)


@pytest.mark.slow
def test_export_generates_what_titan_generates(tmp_path):
    from titan.config.schema import TokenizerConfig
    from titan.data import build_tokenizer
    from titan.tools import generate as generate_tool

    run = run_titan(tmp_path / "run", "training.steps=20", "checkpoint.interval=20", "checkpoint.export_hf=true",
                    "model.context_len=4096").check()
    hf_dir = run.run_dir / "hf"
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["max_position_embeddings"] == 4096  # the model's context, not training.seq_len=32
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    prompt = "def main():\n    "
    ids = tokenizer(prompt, return_tensors="pt").input_ids  # BOS + prompt, as titan's generate frames it
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = generate_tool.run(generate_tool.parse_args([f"checkpoint={run.run_dir}", f"prompt={prompt}",
                                                       "temperature=0", "max_new_tokens=24", "stop_at_eos=false"]))
    # The tool prints text: decode transformers' tokens with titan's tokenizer to compare (HF's
    # byte-fallback decoder renders an incomplete UTF-8 byte run differently, as U+FFFD per byte).
    titan_tokenizer = build_tokenizer(TokenizerConfig())
    assert ids[0].tolist() == [titan_tokenizer.bos_id, *titan_tokenizer.encode(prompt)]
    assert ours == [titan_tokenizer.decode(out[0, 1:].tolist())]
    assert len(out[0]) == len(ids[0]) + 24 and not math.isnan(float(model(out).logits.sum()))
