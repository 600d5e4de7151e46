"""Downstream evaluation: the lm-eval adapter scores like a direct computation and like lm-eval's
own Hugging Face backend on the exported weights, FSDP x 2 scores like one process, and the
training loop writes downstream metrics to metrics.jsonl and W&B."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from titan.eval.lm import TitanLM
from titan.models.llama3 import Llama3, LlamaArgs
from titan.train.launch import free_port
from tests.helpers import REPO, run_titan

TASKS = "tasks=[titan_choice,titan_copy]"
NEEDS_DOWNLOAD = """task: needs_download
dataset_path: Rowan/hellaswag
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{ctx}}"
doc_to_choice: "{{endings}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


class CharTokenizer:
    """Bytes as tokens (+ BOS 256, EOS 257): tokenization cannot hide a scoring mistake."""

    vocab_size, bos_id, eos_id = 258, 256, 257

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")


def _tiny_lm(max_length=48) -> TitanLM:
    model = Llama3(LlamaArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=258, multiple_of=16, max_seq_len=max_length))
    model.init_weights(seed=3)
    return TitanLM(model.eval(), CharTokenizer(), max_length, batch_size=3, max_gen_tokens=6)


def _request(kind, args, i=0):
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


def test_loglikelihood_matches_a_direct_forward():
    lm = _tiny_lm()
    pairs = [("the cat", " sat"), ("a", "bc"), ("", "xyz"), ("long context " * 3, " end")]
    got = lm.loglikelihood([_request("loglikelihood", p) for p in pairs])
    tok = lm.tokenizer
    for (context, continuation), (score, greedy) in zip(pairs, got):
        ctx = [tok.bos_id] + tok.encode(context.rstrip()) if context else [tok.bos_id]
        cont = tok.encode(context[len(context.rstrip()):] + continuation) if context else tok.encode(continuation)
        whole = ctx + cont
        logp = F.log_softmax(lm.model(torch.tensor([whole[:-1]])).float(), -1)[0, len(ctx) - 1:]
        expected = logp.gather(-1, torch.tensor(cont)[:, None]).sum().item()
        assert score == pytest.approx(expected, abs=1e-4) and greedy == bool((logp.argmax(-1) == torch.tensor(cont)).all())
    # Rolling: every token of the text predicted once, in windows of max_length.
    text = "0123456789" * 9
    (rolled,) = lm.loglikelihood_rolling([_request("loglikelihood_rolling", (text,))])
    assert rolled < 0 and math.isfinite(rolled)


def test_cached_and_lockstep_generation_agree():
    """The KV-cache path (plain/FSDP models) and the recompute path (tensor parallel) are greedy
    over the same model: the same text, cut at the stop string."""
    lm = _tiny_lm()
    requests = [_request("generate_until", (c, {"until": ["q"], "max_gen_toks": 5}), i) for i, c in enumerate(["hello", "ab", "xyz w"])]
    cached = lm.generate_until(requests)
    assert cached == lm._generate_lockstep(requests)
    assert all(len(t) <= 5 and "q" not in t for t in cached) and any(cached)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny model trained 30 steps, saved as a titan checkpoint and exported to RUN_DIR/hf."""
    run = run_titan(tmp_path_factory.mktemp("run") / "r", "training.steps=30", "optim.lr=3e-3", "training.seq_len=64",
                    "training.global_batch_size=8", "logging.interval=10", "checkpoint.interval=30", "checkpoint.export_hf=true").check()
    _ensure_hf_tokenizer(run.run_dir)
    return run.run_dir


def _ensure_hf_tokenizer(run_dir):
    """RUN_DIR/hf gets the run's tokenizer from checkpoint.export_hf; until then, place the
    run's sentencepiece model there as transformers' LlamaTokenizer reads it."""
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(str(run_dir / "hf"))
        return
    except Exception:
        pass
    from titan.config.schema import TokenizerConfig
    from titan.data import build_tokenizer

    spm = build_tokenizer(TokenizerConfig())
    shutil.copy(spm.path, run_dir / "hf" / "tokenizer.model")
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
              "add_prefix_space": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (run_dir / "hf" / "tokenizer_config.json").write_text(json.dumps(config))


def _titan_eval(run_dir, *extra, launcher=()):
    out = run_dir / "eval" / f"scores-{len(launcher)}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *launcher, "-m", "titan.tools.eval", f"checkpoint={run_dir}", TASKS, "limit=24",
                           f"out={out}", *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())["scores"], proc.stdout


@pytest.mark.slow
def test_titan_checkpoint_scores_equal_lm_eval_hf_backend_on_the_export(trained_run):
    from lm_eval import simple_evaluate

    from titan.eval.harness import primary_metrics, task_manager

    titan_scores, table = _titan_eval(trained_run)
    assert "titan_choice" in table and "exact_match" in table
    results = simple_evaluate(
        model="hf", model_args={"pretrained": str(trained_run / "hf"), "dtype": "float32", "add_bos_token": True, "max_length": 64, "device": "cpu"},
        tasks=["titan_choice", "titan_copy"], limit=24, batch_size=8, task_manager=task_manager(["titan_choice"]),
        bootstrap_iters=0,
    )
    hf_scores = primary_metrics(results)
    for task in ("titan_choice", "titan_copy"):
        for metric in titan_scores[task]:
            if not metric.endswith("_stderr"):
                assert titan_scores[task][metric] == pytest.approx(hf_scores[task][metric], abs=1e-9), (task, metric)
    assert 0 < titan_scores["titan_choice"]["acc"] < 1  # a score that can differ, not a constant


@pytest.mark.slow
def test_fsdp_two_ranks_score_like_one_process(trained_run):
    single, _ = _titan_eval(trained_run)
    sharded, _ = _titan_eval(trained_run, launcher=("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())))
    assert sharded == single


@pytest.mark.slow
def test_in_loop_evaluation_on_fsdp_writes_metrics_and_wandb(tmp_path):
    # A task whose dataset is on the Hub, run without network: one line, and training goes on.
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "needs_download.yaml").write_text(NEEDS_DOWNLOAD)
    run = run_titan(tmp_path / "r", "parallel=fsdp", "training.steps=4", "training.val_interval=2", "training.val_batches=1",
                    "eval.interval=2", "eval.tasks=[titan_choice,titan_copy,needs_download]", "eval.limit=6",
                    f"eval.include_path={tasks}", "eval.max_gen_tokens=8", "logging=wandb", env={"HF_HUB_OFFLINE": "1"}).check()
    downstream = [r for r in run.records if "eval/titan_choice/acc" in r]
    assert [r["step"] for r in downstream] == [2, 4] and [r["tokens_seen"] for r in downstream] == [256, 512]
    assert all(0 <= r["eval/titan_choice/acc"] <= 1 and "eval/titan_copy/exact_match" in r for r in downstream)
    assert "eval task 'needs_download' skipped: cannot load it (ConnectionError" in run.stdout + run.stderr
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["eval/titan_choice/acc"] == downstream[-1]["eval/titan_choice/acc"]
    (wandb_file,) = (run.run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"eval/titan_choice/acc" in wandb_file.read_bytes()
    # Evaluation leaves training alone: the same losses as without it (RNG, modes restored).
    plain = run_titan(tmp_path / "plain", "parallel=fsdp", "training.steps=4", "training.val_interval=2", "training.val_batches=1").check()
    assert plain.losses == run.losses
