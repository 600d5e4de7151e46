"""Conversion between titan checkpoints, Hugging Face Llama and torch.save (tiny models, seconds)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

from tests.tiny_llama import random_llama, tiny_args
from titan.interop import (
    CheckpointReadError,
    args_from_hf_config,
    from_hf,
    hf_config,
    load_dcp_model_state,
    load_hf,
    load_weights,
    save_hf,
    to_hf,
)
from titan.config.errors import ConfigError
from titan.interop.dcp_io import read_dcp_metadata
from titan.interop.errors import ConversionError
from titan.models.llama3 import LlamaArgs
from titan.tools import convert as convert_tool

VARIANTS = {
    "gqa": tiny_args(),
    "mha": tiny_args(n_kv_heads=None),
    "tied": tiny_args(tie_embeddings=True),
    # Llama 3.1 scaling with a short original context, so all three frequency bands occur.
    "scaled": tiny_args(rope_scaling_factor=8.0, rope_original_max_seq_len=32, n_kv_heads=1),
}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------
# An independent forward in Hugging Face's conventions: HF names, half-split rotary.
# ---------------------------------------------------------------------------------------------
def hf_inv_freq(cfg: dict) -> torch.Tensor:
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
    rs = cfg["rope_scaling"]
    if not rs:
        return inv
    low_wl = rs["original_max_position_embeddings"] / rs["low_freq_factor"]
    high_wl = rs["original_max_position_embeddings"] / rs["high_freq_factor"]
    out = []
    for f in inv.tolist():
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(f)
        elif wl > low_wl:
            out.append(f / rs["factor"])
        else:
            s = (rs["original_max_position_embeddings"] / wl - rs["low_freq_factor"]) / (rs["high_freq_factor"] - rs["low_freq_factor"])
            out.append((1 - s) * f / rs["factor"] + s * f)
    return torch.tensor(out)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def hf_reference_logits(sd: dict, cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    n_h, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg["hidden_size"] // n_h
    eps = cfg["rms_norm_eps"]
    bsz, seq = ids.shape
    angles = torch.outer(torch.arange(seq).float(), hf_inv_freq(cfg))
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    causal = torch.full((seq, seq), float("-inf")).triu(1)
    x = sd["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"], eps)
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(bsz, seq, n_h, hd).transpose(1, 2)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(bsz, seq, n_kv, hd).transpose(1, 2)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(bsz, seq, n_kv, hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k = k[:, :, None].expand(bsz, n_kv, n_h // n_kv, seq, hd).reshape(bsz, n_h, seq, hd)
        v = v[:, :, None].expand(bsz, n_kv, n_h // n_kv, seq, hd).reshape(bsz, n_h, seq, hd)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + causal, dim=-1) @ v
        x = x + att.transpose(1, 2).reshape(bsz, seq, -1) @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"], eps)
        gate, up = h @ sd[p + "mlp.gate_proj.weight"].T, h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    x = rms(x, sd["model.norm.weight"], eps)
    head = sd["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else sd["lm_head.weight"]
    return x @ head.T


# ---------------------------------------------------------------------------------------------
# Pure conversion
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_is_exact(variant):
    args = VARIANTS[variant]
    sd = random_llama(args).state_dict()
    hf = to_hf(sd, args)
    assert ("lm_head.weight" in hf) == (not args.tie_embeddings)
    assert hf["model.layers.1.mlp.gate_proj.weight"] is sd["layers.1.feed_forward.w1.weight"]
    # The rotary projections really are reordered (not renamed), yet come back bit for bit.
    assert not torch.equal(hf["model.layers.0.self_attn.q_proj.weight"], sd["layers.0.attention.wq.weight"])
    assert not torch.equal(hf["model.layers.0.self_attn.k_proj.weight"], sd["layers.0.attention.wk.weight"])
    back = from_hf(hf, args)
    assert_same(back, sd)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_weights_give_titan_logits_in_an_independent_hf_forward(variant):
    args = VARIANTS[variant]
    model = random_llama(args, seed=1)
    ids = torch.randint(0, args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf_reference_logits(to_hf(model.state_dict(), args), hf_config(args), ids)
    assert ours.abs().max() > 1  # not a degenerate comparison of near-zero logits
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["gqa", "tied", "scaled"])
def test_transformers_llama_matches(tmp_path, variant):
    import transformers
    args = VARIANTS[variant]
    model = random_llama(args, seed=2)
    save_hf(tmp_path, model.state_dict(), args)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, model(ids), atol=2e-5, rtol=1e-5)


def test_key_mismatch_is_reported():
    args = tiny_args()
    sd = random_llama(args).state_dict()
    del sd["layers.1.ffn_norm.weight"]
    with pytest.raises(ConversionError, match="missing 1.*layers.1.ffn_norm.weight"):
        to_hf(sd, args)
    with pytest.raises(ConversionError, match="unexpected"):
        from_hf({**to_hf(random_llama(args).state_dict(), args), "model.layers.9.mlp.x": torch.zeros(1)}, args)


@pytest.mark.parametrize("args", [
    tiny_args(),
    tiny_args(tie_embeddings=True, rope_scaling_factor=8.0, n_kv_heads=None),
    LlamaArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
              ffn_dim_multiplier=1.3, rope_scaling_factor=8.0, max_seq_len=131072),  # Llama 3.1 8B
    LlamaArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.5),  # 1B
    LlamaArgs(dim=96, n_heads=4, multiple_of=16, ffn_dim_multiplier=0.5),  # FFN below 8/3 x dim
])
def test_hf_config_round_trip(args):
    cfg = json.loads(json.dumps(hf_config(args)))  # survives JSON
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["intermediate_size"] == args.ffn_hidden
    assert (cfg["rope_scaling"] is not None) == (args.rope_scaling_factor is not None)
    back = args_from_hf_config(cfg)
    for field in ("dim", "n_layers", "n_heads", "kv_heads", "vocab_size", "ffn_hidden", "norm_eps", "rope_theta",
                  "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                  "rope_original_max_seq_len", "tie_embeddings", "max_seq_len"):
        assert getattr(back, field) == getattr(args, field), field


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_parameters": None}, "RoPE type 'linear'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "mistral"}, "model_type"),
    ({"head_dim": 32}, "head_dim"),
])
def test_unsupported_hf_configs_are_refused(change, message):
    with pytest.raises(ConversionError, match=message):
        args_from_hf_config({**hf_config(tiny_args()), **change})


# ---------------------------------------------------------------------------------------------
# Files: safetensors, DCP, torch.save
# ---------------------------------------------------------------------------------------------
def test_safetensors_sharding_index_and_reload(tmp_path):
    args = tiny_args()
    sd = random_llama(args).state_dict()
    files = save_hf(tmp_path, sd, args, max_shard_bytes=40_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    hf = to_hf(sd, args)
    assert set(index["weight_map"]) == set(hf) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in hf.values())
    assert len(files) == len(shards) + 2
    loaded, loaded_args = load_hf(tmp_path)
    assert_same(loaded, sd)
    assert loaded_args.ffn_hidden == args.ffn_hidden and loaded_args.kv_heads == args.kv_heads
    # Re-exporting unsharded into the same dir leaves no stale shards behind.
    save_hf(tmp_path, sd, args)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    assert_same(load_hf(tmp_path)[0], sd)


def test_truncated_safetensors_shard_is_named(tmp_path):
    args = tiny_args()
    save_hf(tmp_path, random_llama(args).state_dict(), args, max_shard_bytes=40_000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.raises(CheckpointReadError, match=victim.name) as err:
        load_hf(tmp_path)
    assert err.value.path == str(victim)


def make_run_dir(root, args: LlamaArgs, model, steps=(10,), incomplete_step=20):
    """A run dir as the trainer leaves it: .hydra/config.yaml and checkpoints/step-*/ (DCP)."""
    (root / ".hydra").mkdir(parents=True)
    (root / ".hydra" / "config.yaml").write_text(
        "model:\n  name: llama3_tiny\n  dim: 64\n  n_layers: 2\n  n_heads: 4\n  n_kv_heads: 2\n"
        "  vocab_size: -1\n  multiple_of: 32\n  rope_theta: 10000.0\n"
        f"  tie_embeddings: {str(args.tie_embeddings).lower()}\n"
        f"training:\n  seq_len: 64\n  seed: 42\ntokenizer:\n  kind: default\n  vocab_size: {max(args.vocab_size, 512)}\n"
    )
    optim = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optim.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in (*steps, incomplete_step):
            path = root / "checkpoints" / f"step-{step:08d}"
            dcp.save({"model": model.state_dict(), "optim": optim.state_dict(), "train": {"step": step}},
                     checkpoint_id=str(path))
            if step != incomplete_step:
                (path / ".complete").write_text("done\n")
    return root / "checkpoints" / f"step-{steps[-1]:08d}"


@pytest.mark.parametrize("tied", [False, True])
def test_run_dir_to_hf_titan_torch_and_back(tmp_path, tied):
    args = tiny_args(tie_embeddings=tied)
    model = random_llama(args)
    ckpt = make_run_dir(tmp_path / "run", args, model)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}

    loaded = load_weights(tmp_path / "run")
    assert loaded.path == ckpt and loaded.kind == "dcp" and loaded.run_dir == tmp_path / "run"
    assert loaded.args.vocab_size == 128 and loaded.args.max_seq_len == 64 and loaded.args.tie_embeddings == tied
    assert_same(loaded.state_dict, sd)
    assert loaded.run_config()["tokenizer"]["kind"] == "default"

    assert convert_tool.main([str(tmp_path / "run"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf_sd, hf_args = load_hf(tmp_path / "hf")
    assert_same(hf_sd, sd)
    assert hf_args.tie_embeddings == tied

    # HF -> titan DCP checkpoint (what checkpoint.initial_load reads) -> torch.save -> back again.
    assert convert_tool.main([str(tmp_path / "hf"), str(tmp_path / "init"), "--to", "titan"]) == 0
    assert (tmp_path / "init" / ".complete").is_file()
    assert_same(load_dcp_model_state(tmp_path / "init"), sd)
    assert convert_tool.main([str(tmp_path / "init"), str(tmp_path / "w.pt"), "--to", "torch"]) == 0
    assert_same(torch.load(tmp_path / "w.pt", weights_only=True), sd)
    again = load_weights(tmp_path / "w.pt", preset="llama3_tiny")
    assert again.args.vocab_size == 128
    assert_same(again.state_dict, sd)


def test_run_dir_to_hf_writes_the_run_tokenizer_and_hf_to_hf_keeps_it(tmp_path):
    import transformers

    from titan.config.schema import TokenizerConfig
    from titan.data import build_tokenizer

    args = tiny_args(vocab_size=512)
    make_run_dir(tmp_path / "run", args, random_llama(args))
    assert convert_tool.main([str(tmp_path / "run"), str(tmp_path / "hf"), "--to", "hf", "--dtype", "bfloat16"]) == 0
    ours = build_tokenizer(TokenizerConfig(vocab_size=512))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "def main(argv):\n    return 0\n"
    assert hf(text).input_ids == [ours.bos_id, *ours.encode(text)]
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (ours.bos_id, ours.eos_id)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.dtype == torch.bfloat16
    assert convert_tool.main([str(tmp_path / "hf"), str(tmp_path / "hf2"), "--to", "hf"]) == 0
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf2")(text).input_ids == hf(text).input_ids


def test_dtype_cast_and_checkpoint_dir_inside_run(tmp_path):
    args = tiny_args()
    ckpt = make_run_dir(tmp_path / "run", args, random_llama(args), steps=(5, 10))
    assert convert_tool.main([str(ckpt), str(tmp_path / "hf"), "--to", "hf", "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_hf(tmp_path / "hf")[0]["norm.weight"].dtype == torch.bfloat16


def test_incomplete_checkpoint_is_refused_by_name(tmp_path, capsys):
    args = tiny_args()
    make_run_dir(tmp_path / "run", args, random_llama(args))
    partial = tmp_path / "run" / "checkpoints" / "step-00000020"
    with pytest.raises(CheckpointReadError, match="incomplete") as err:
        load_dcp_model_state(partial)
    assert err.value.path == str(partial)
    assert convert_tool.main([str(partial), str(tmp_path / "out"), "--to", "hf"]) == 2
    assert "step-00000020" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_corrupted_dcp_file_is_named(tmp_path):
    args = tiny_args()
    ckpt = make_run_dir(tmp_path / "run", args, random_llama(args))
    data_file = next(ckpt.glob("*.distcp"))
    # Cut the file in the middle of the last model tensor (optimizer state may sit after it).
    cut = max(info.offset + info.length // 2 for index, info in read_dcp_metadata(ckpt).storage_data.items()
              if index.fqn.startswith("model."))
    data_file.write_bytes(data_file.read_bytes()[:cut])
    with pytest.raises(CheckpointReadError, match="truncated or corrupted") as err:
        load_dcp_model_state(ckpt)
    assert err.value.path == str(data_file)


def test_metadata_pickle_cannot_run_code(tmp_path):
    args = tiny_args()
    ckpt = make_run_dir(tmp_path / "run", args, random_llama(args))
    marker = tmp_path / "pwned"
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    (ckpt / ".metadata").write_bytes(payload)
    with pytest.raises(CheckpointReadError, match="refusing to load os.system"):
        load_dcp_model_state(ckpt)
    assert not marker.exists()


def test_wrong_preset_and_missing_args_are_clear(tmp_path):
    args = tiny_args()
    torch.save(random_llama(args).state_dict(), tmp_path / "w.pt")
    with pytest.raises(ConversionError, match="name a preset"):
        load_weights(tmp_path / "w.pt")
    with pytest.raises(ConversionError, match="wrong model preset"):
        load_weights(tmp_path / "w.pt", preset="llama3_debug")
    with pytest.raises(ConversionError, match="no model preset 'nope'.*llama3_tiny"):
        load_weights(tmp_path / "w.pt", preset="nope")
    with pytest.raises(ConversionError, match="not a run dir"):
        load_weights(tmp_path)


def test_cli_entry_point(tmp_path):
    args = tiny_args()
    make_run_dir(tmp_path / "run", args, random_llama(args))
    ok = subprocess.run([sys.executable, "-m", "titan.tools.convert", str(tmp_path / "run"), str(tmp_path / "hf"),
                         "--to", "hf", "--max-shard-size", "50KB"], capture_output=True, text=True, timeout=120, check=False)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()


def test_cli_reports_a_missing_source(tmp_path, capsys):
    assert convert_tool.main([str(tmp_path / "missing"), str(tmp_path / "x"), "--to", "titan"]) == 2
    assert "missing: no such file or directory" in capsys.readouterr().err


def test_initial_weights_from_hf_and_dcp(tmp_path):
    from titan.interop import initial_weights

    args = tiny_args(tie_embeddings=True)
    model = random_llama(args)
    sd = model.state_dict()
    save_hf(tmp_path / "hf", sd, args)
    assert_same(initial_weights(f"hf:{tmp_path / 'hf'}", args), sd)
    make_run_dir(tmp_path / "run", args, model)
    assert_same(initial_weights(str(tmp_path / "run"), args), model.state_dict())
    with pytest.raises(ConfigError, match=r"model.dim=128 but checkpoint.initial_load=hf:.* has dim=64"):
        initial_weights(f"hf:{tmp_path / 'hf'}", tiny_args(tie_embeddings=True, dim=128))
