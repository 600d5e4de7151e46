"""Batched prompts (`prompts=FILE`, JSONL out) and tensor-parallel generation through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.test_generate import CharTokenizer
from tests.tiny_llama import random_llama, tiny_args
from titan.generate import generate, generate_batch
from titan.interop import save_dcp_model
from titan.tools import generate as generate_tool

PROMPTS = [[5, 17, 99, 3, 42, 7], [1, 2], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12], [3]]


@pytest.fixture(scope="module")
def model():
    return random_llama(tiny_args(max_seq_len=64), seed=3)


def test_a_batch_gives_each_prompt_the_tokens_it_gets_alone(model):
    """Left padding: different lengths in one batch, greedy and sampled, cut at EOS."""
    for kwargs in ({"temperature": 0}, {"temperature": 0.9, "top_k": 20, "seed": 3}):
        alone = [generate(model, p, 12, **kwargs)[0, len(p):].tolist() for p in PROMPTS]
        assert generate_batch(model, PROMPTS, 12, **kwargs) == alone
        assert len({tuple(a) for a in alone}) == len(PROMPTS)
    greedy = [generate(model, p, 12, temperature=0)[0, len(p):].tolist() for p in PROMPTS]
    eos = greedy[2][4]  # the 3rd prompt stops after 4 tokens (earlier if it occurs before)
    got = generate_batch(model, PROMPTS, 12, temperature=0, eos_id=eos)
    assert got == [g[:g.index(eos)] if eos in g else g for g in greedy] and len(got[2]) <= 4


def _ckpt(tmp_path, model) -> str:
    save_dcp_model(tmp_path / "ckpt", model.state_dict(), model.args)
    return str(tmp_path / "ckpt")


def test_prompts_file_to_jsonl_equals_one_prompt_at_a_time(tmp_path, model, monkeypatch, capsys):
    import titan.data

    monkeypatch.setattr(titan.data, "build_tokenizer", lambda cfg: CharTokenizer())
    base = [f"checkpoint={_ckpt(tmp_path, model)}", "tokenizer_kind=default", "max_new_tokens=6", "temperature=0"]

    def alone(*extra) -> str:
        assert generate_tool.main([*base, *extra]) == 0
        return capsys.readouterr().out.rstrip("\n")

    text = ["def f(x):", "x = 1", "import os, sys"]
    (tmp_path / "p.txt").write_text(f"{text[0]}\n\n{text[1]}\n{text[2]}\n")
    assert generate_tool.main([*base, f"prompts={tmp_path / 'p.txt'}", f"out={tmp_path / 'o.jsonl'}", "batch_size=2"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 3 completions to {tmp_path / 'o.jsonl'}"
    records = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == text
    for r in records:
        assert r["prompt"] + r["completion"] == alone(f"prompt={r['prompt']}")
        assert r["prompt_tokens"] == len(r["prompt"]) + 1  # one id per character, and BOS
        assert r["completion_tokens"] == len(r["completion"]) <= 6  # up to EOS, excluded

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    lines = [json.dumps({"messages": messages}), json.dumps({"prompt": "what is 2+2?"})]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    assert generate_tool.main([*base, "chat=true", f"prompts={tmp_path / 'c.jsonl'}"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in printed] == [messages, "what is 2+2?"]
    assert printed[0]["completion"] == alone("chat=true", f"prompt={json.dumps(messages)}")
    assert printed[1]["completion"] == alone("chat=true", "prompt=what is 2+2?")


def test_prompts_file_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    (tmp_path / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    (tmp_path / "fields.jsonl").write_text('{"text": "hi"}\n')
    cases = {
        "prompts=nowhere.txt": "prompts=nowhere.txt: no such file",
        f"prompts={tmp_path / 'empty.txt'}": "holds no prompt",
        f"prompts={tmp_path / 'bad.jsonl'}": "line 2: not valid JSON",
        f"prompts={tmp_path / 'chat.jsonl'}": "line 1: 'messages' conversations need chat=true",
        f"prompts={tmp_path / 'fields.jsonl'}": "expected a 'prompt' string; found fields ['text']",
        "parallel.tp=2": "parallel.tp=2 needs 2 processes: add parallel.nproc_per_node=2",
    }
    for arg, message in cases.items():
        assert generate_tool.main([f"checkpoint={tmp_path}", arg]) == 2, arg
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (arg, err)
    assert generate_tool.main(["checkpoint=x", "prompts=p.txt", "prompt=hi"]) == 2
    assert "replaces prompt" in capsys.readouterr().err
    assert generate_tool.main(["checkpoint=x", "parallel.tp=2", "parallel.nproc_per_node=3"]) == 2
    assert "must equal parallel.nproc_per_node=3" in capsys.readouterr().err


@pytest.mark.slow
def test_tensor_parallel_cli_self_launched_and_under_torchrun(tmp_path, capsys):
    """`parallel.tp=2 parallel.nproc_per_node=2` (self-launched) and torchrun: the model is
    sharded over two gloo ranks, the tokens are one process's, and only rank 0 writes."""
    from titan.train.launch import free_port

    model = random_llama(tiny_args(vocab_size=2048), seed=5)  # the default tokenizer's vocabulary
    base = [f"checkpoint={_ckpt(tmp_path, model)}", "tokenizer_kind=default", "max_new_tokens=8", "temperature=0"]
    (tmp_path / "p.txt").write_text("def main():\nimport json\nclass A(object):\n")
    files = [f"prompts={tmp_path / 'p.txt'}", "batch_size=2"]
    assert generate_tool.main([*base, *files, f"out={tmp_path / 'one.jsonl'}"]) == 0
    assert generate_tool.main([*base, "prompt=for i in"]) == 0
    one_prompt = capsys.readouterr().out.splitlines()[-1]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "titan.tools.generate", *base]
    tp = subprocess.run([*cli, *files, f"out={tmp_path / 'tp.jsonl'}", "parallel.tp=2", "parallel.nproc_per_node=2"],
                        capture_output=True, text=True, env=env, timeout=300)
    assert tp.returncode == 0, tp.stderr[-3000:]
    assert tp.stdout.count("wrote 3 completions") == 1
    assert (tmp_path / "tp.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "titan.tools.generate"]
    run = subprocess.run([*torchrun, *base, "prompt=for i in"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines() == [one_prompt]  # printed once, by rank 0


def test_a_batch_matches_transformers_left_padded_generate(tmp_path, model):
    """The same weights in transformers' Llama, its own left padding and attention mask:
    the greedy tokens of a batch of different lengths agree."""
    from transformers import AutoModelForCausalLM

    from titan.interop.safetensors_io import save_hf

    save_hf(tmp_path / "hf", model.state_dict(), model.args)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    width = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out[:, width:].tolist() == generate_batch(model, PROMPTS, 10, temperature=0)
