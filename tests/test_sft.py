"""Supervised fine-tuning: chat templates, assistant-only labels, the trained-token loss."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from titan.config.errors import ConfigError
from titan.config.schema import DataConfig, SFTOverflow, SFTPacking
from titan.data.chat import JinjaTemplate, Llama3Template, build_chat_template, encode_conversation, to_messages
from titan.data.sft import IGNORE, SFTLoader, embedded_conversations, load_conversations
from titan.models.document_mask import document_ids
from titan.models.llama3 import Llama3, LlamaArgs
from titan.train.build import TokenSumLoss


class CharTokenizer:
    """One id per character (ids 3..), BOS 1, EOS 2: easy to reason about in tests."""

    bos_id, eos_id, vocab_size = 1, 2, 131

    def encode(self, text: str) -> list[int]:
        return [3 + min(ord(c), 127) for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i - 3) for i in ids if i > 2)


TOK = CharTokenizer()
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "and 3+3"}, {"role": "assistant", "content": "six"}],
    [{"role": "user", "content": "name?"}, {"role": "assistant", "content": "titan"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a longer answer"}],
]


def _loader(conversations, seq_len, packing=SFTPacking.pack, overflow=SFTOverflow.truncate, **kw) -> SFTLoader:
    template = Llama3Template()
    named = [(str(i), c) for i, c in enumerate(conversations)]
    return SFTLoader(named, lambda m: encode_conversation(TOK, template, m), TOK.eos_id, seq_len,
                     kw.pop("global_batch_size", 1), kw.pop("micro_batch_size", 1), shuffle=False,
                     packing=packing, overflow=overflow, **kw)


def test_labels_are_the_assistant_turns_only() -> None:
    ids, trained = encode_conversation(TOK, Llama3Template(), CONVERSATIONS[1])
    text = TOK.decode([i for i, t in zip(ids, trained) if t])
    assert text == "4<|eot_id|>six<|eot_id|>"
    assert trained[-1] and ids[-1] == TOK.eos_id and ids[0] == TOK.bos_id and not trained[0]


def test_packed_masked_loss_equals_hand_computed_mean_over_assistant_tokens() -> None:
    lengths = [len(encode_conversation(TOK, Llama3Template(), c)[0]) for c in CONVERSATIONS]
    seq_len = lengths[0] + lengths[1] + 4  # two conversations in the first row, then padding
    inputs, labels = _loader(CONVERSATIONS, seq_len, global_batch_size=2, micro_batch_size=2).next_batch()
    per_row = (inputs == TOK.bos_id).sum(dim=1).tolist()
    assert per_row[0] == 2 and per_row[1] >= 2  # several conversations per row
    packed = CONVERSATIONS[:2] + (CONVERSATIONS[2:] + CONVERSATIONS)[: per_row[1]]  # the second row wraps to epoch 1

    torch.manual_seed(0)
    model = Llama3(LlamaArgs(dim=64, n_layers=2, n_heads=4, vocab_size=131, multiple_of=32, max_seq_len=seq_len))
    model.init_weights(seed=0)
    n_trained = int((labels != IGNORE).sum())
    loss = TokenSumLoss(n_trained)(model(inputs, document_ids=document_ids(inputs, TOK.bos_id)), labels)

    # By hand: each conversation alone, CE on the targets that are assistant tokens.
    total, count = 0.0, 0
    for conv in packed:
        ids, trained = encode_conversation(TOK, Llama3Template(), conv)
        ids_t = torch.tensor(ids)
        logits = model(ids_t[None, :-1])[0].detach()
        keep = torch.tensor(trained[1:])
        total += float(F.cross_entropy(logits[keep], ids_t[1:][keep], reduction="sum"))
        count += int(keep.sum())
    assert count == n_trained
    assert float(loss) == pytest.approx(total / count, rel=1e-5)


def test_overflow_is_truncated_or_dropped_and_counted() -> None:
    longest = max(len(encode_conversation(TOK, Llama3Template(), c)[0]) for c in CONVERSATIONS)
    seq_len = longest - 6
    trunc = _loader(CONVERSATIONS, seq_len, packing=SFTPacking.pad)
    rows = [trunc.next_batch() for _ in range(4)]
    assert trunc.stats["truncated"] == 1 and all(r[0].shape[1] <= seq_len for r in rows)
    drop = _loader(CONVERSATIONS, seq_len, packing=SFTPacking.pad, overflow=SFTOverflow.drop)
    for _ in range(4):
        drop.next_batch()
    assert drop.stats["dropped"] == 1
    # Cut before any assistant token: nothing to learn from, so dropped even when truncating.
    short = _loader(CONVERSATIONS, 20, packing=SFTPacking.pad)
    with pytest.raises(ConfigError, match="data.sft_overflow"):
        short.next_batch()
    assert short.stats == {"conversations": 4, "truncated": 0, "dropped": 4}


def test_padding_mode_pads_to_the_longest_in_the_micro_batch() -> None:
    loader = _loader(CONVERSATIONS, 512, packing=SFTPacking.pad, global_batch_size=2, micro_batch_size=2, pad_multiple=4)
    inputs, labels = loader.next_batch()
    longest = max(len(encode_conversation(TOK, Llama3Template(), c)[0]) for c in CONVERSATIONS[:2]) - 1
    assert inputs.shape == (2, -(-longest // 4) * 4)
    assert (inputs == TOK.bos_id).sum(dim=1).tolist() == [1, 1]


def test_loader_resumes_mid_step() -> None:
    a = _loader(CONVERSATIONS * 3, 400, global_batch_size=2, micro_batch_size=1)
    a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(3)]
    b = _loader(CONVERSATIONS * 3, 400, global_batch_size=2, micro_batch_size=1)
    b.load_state_dict(state)
    for (x, y), (u, v) in zip(expected, [b.next_batch() for _ in range(3)]):
        assert torch.equal(x, u) and torch.equal(y, v)


def test_formats_and_the_error_naming_the_fields(tmp_path) -> None:
    assert to_messages({"prompt": "p", "response": "r"}, "auto", "x")[-1] == {"role": "assistant", "content": "r"}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ConfigError, match=r"data.sft_format.*found fields \['answer', 'question'\]"):
        load_conversations(DataConfig(path=str(path), val_fraction=0.0), "train")


def test_jinja_template_renders_like_transformers(tmp_path) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    source = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": source, "eos_token": "</s>"}))
    (tmp_path / "tok.model").write_text("")
    template = build_chat_template(None, str(tmp_path / "tok.model"))
    assert isinstance(template, JinjaTemplate)
    conv = CONVERSATIONS[1]
    segments = template.segments(conv)
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")), eos_token="</s>")
    assert "".join(t for t, _ in segments) == hf.apply_chat_template(conv, chat_template=source, tokenize=False)
    assert [t for t, trained in segments if trained] == ["4</s>\n", "six</s>\n"]
    assert template.prompt(conv[:1]) == hf.apply_chat_template(conv[:1], chat_template=source, tokenize=False, add_generation_prompt=True)


def test_embedded_set_has_a_held_out_split() -> None:
    pairs = embedded_conversations()
    assert len(pairs) > 500
    cfg = DataConfig(val_fraction=0.05)
    train, val = load_conversations(cfg, "train"), load_conversations(cfg, "val")
    assert len(train) + len(val) == len(pairs) and 0 < len(val) < len(train)
    assert not {n for n, _ in train} & {n for n, _ in val}


def _chat_file(path) -> str:
    """Conversations with answers of very different lengths: micro-batches train unequal
    numbers of tokens."""
    import random

    rng = random.Random(0)
    words = "alpha beta gamma delta data model rank step token layer".split()
    lines = []
    for i in range(120):
        answer = " ".join(rng.choice(words) for _ in range(rng.choice((1, 2, 15, 30))))
        if i % 3:
            lines.append({"prompt": f"question {i}: " + " ".join(rng.choice(words) for _ in range(4)), "response": answer})
        else:
            lines.append({"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": answer},
                                       {"role": "user", "content": "more"}, {"role": "assistant", "content": answer[:9]}]})
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return str(path)


@pytest.mark.slow
def test_sft_losses_match_across_layouts_with_gradient_accumulation(tmp_path) -> None:
    """task=sft through the real trainer: packed conversations (document-masked), 4 or 2
    micro-batches per step with different trained-token counts; single, fsdp, tp and pp agree."""
    from tests.helpers import run_titan

    common = ("task=sft", f"data.path={_chat_file(tmp_path / 'chat.jsonl')}", "training.steps=3", "training.seq_len=64",
              "training.global_batch_size=8", "training.micro_batch_size=2", "training.val_interval=3", "training.val_batches=1",
              "data.val_fraction=0.2", "optim.lr=3e-3")
    ref = run_titan(tmp_path / "single", *common).check()
    assert len(ref.losses) == 3 and len(ref.val) == 1
    for layout in ("fsdp", "tp", "pp"):
        run = run_titan(tmp_path / layout, *common, f"parallel={layout}").check()
        assert run.losses == pytest.approx(ref.losses, rel=1e-5), layout
        assert [r["grad_norm"] for r in run.train] == pytest.approx([r["grad_norm"] for r in ref.train], rel=1e-5), layout
        assert run.val[0]["val_loss"] == pytest.approx(ref.val[0]["val_loss"], rel=1e-5), layout


@pytest.mark.slow
def test_embedded_sft_held_out_loss_falls(tmp_path) -> None:
    """`task=sft` on the embedded stdlib question/answer set: the held-out masked loss ends
    well below where it started."""
    from tests.helpers import run_titan

    run = run_titan(tmp_path / "run", "task=sft", "training.steps=30", "training.seq_len=128", "training.global_batch_size=4",
                    "training.val_interval=30", "training.val_batches=2", "optim.lr=3e-3", "checkpoint.interval=30").check()
    start, end = run.losses[0], run.val[-1]["val_loss"]  # at step 1 the model is still its random init
    assert start > 7.0 and end < start - 2.0, (start, end)

    # The chat CLI applies the run's template and prints the assistant's reply only.
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    proc = subprocess.run(
        [sys.executable, "-m", "titan.tools.generate", f"checkpoint={tmp_path / 'run'}", "chat=true",
         "prompt=What does `json.dumps(obj)` do?", "temperature=0", "max_new_tokens=24"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    reply = proc.stdout.strip()  # may be empty this early in training (an immediate end of turn)
    assert "<|start_header_id|>" not in reply and "What does" not in reply


def test_llama3_8b_sft_experiment_composes_validates_and_dry_runs(tmp_path) -> None:
    from tests.helpers import run_titan
    from tests.test_config import compose_typed
    from titan.config.schema import DType, Task
    from titan.config.validate import validate

    cfg = compose_typed("experiment=llama3_8b_sft", "tokenizer=default")
    assert (cfg.model.name, cfg.parallel.name, cfg.task.name, cfg.precision.param_dtype) == ("llama3_8b", "fsdp", Task.sft, DType.bfloat16)
    assert cfg.optim.lr == 2e-5 and cfg.lr_schedule.name.value == "cosine" and cfg.checkpoint.export_hf
    validate(cfg, world_size=8)  # 64 sequences over 8 ranks, 2 per micro-batch
    run = run_titan(tmp_path / "dry", "experiment=llama3_8b_sft", "tokenizer=default", "training.dry_run=true", tiny=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "8,030,261,248 parameters" in run.stdout
