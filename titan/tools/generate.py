"""Generate text from a trained checkpoint.

    python -m titan.tools.generate checkpoint=RUN_DIR_OR_CKPT prompt="Once upon a time" \
        max_new_tokens=64 temperature=0.8 top_k=50 top_p=0.95 seed=0

Arguments are key=value (Hydra-style; values are taken literally, so a prompt may hold spaces,
colons or '='). Keys:
    checkpoint      run dir (latest complete checkpoint), DCP checkpoint dir, Hugging Face dir,
                    or torch.save file (required)
    prompt          text, encoded with the run's tokenizer (its `.hydra/config.yaml` `tokenizer:`)
    prompt_ids      comma-separated token ids instead of text: no tokenizer needed, prints ids
    model           preset for weights without a config (conf/model/NAME.yaml)
    max_new_tokens  64;  temperature 0.8 (0: greedy);  top_k 50 (0: off);  top_p 0.95 (1: off)
    seed            0;  num_samples 1 (sequences drawn from the same prompt)
    bos             true: start the prompt with the tokenizer's BOS (as training framed documents)
    stop_at_eos     true;  device cpu | cuda | auto;  dtype float32 | bfloat16 | float16
    tokenizer_kind, tokenizer_path   override the run's tokenizer (e.g. for a Hugging Face dir)
    chat            false; true: `prompt` is a user message (or a JSON list of {role, content}
                    messages), wrapped in the run's chat template (data.chat_template: the
                    tokenizer's Jinja template, else titan's Llama 3 template); prints the reply
    chat_template   override it: llama3 or a .jinja file
    prompts         a file of prompts instead of `prompt`: one per line, or a .jsonl file of
                    {"prompt": ...} records (with chat=true also {"messages": [...]}). They are
                    decoded batch_size (8) at a time, left-padded: each gets the tokens it gets
                    alone. Results are JSON lines {prompt, completion, prompt_tokens,
                    completion_tokens}, printed or written to `out`
    out             the JSONL file for `prompts` results (default: print them)
    parallel.tp     tensor-parallel degree (-1: every process); the model is sharded over the
                    processes, which decode the same tokens as one process
    parallel.nproc_per_node   processes to start here (tp over them), e.g. 2; or run the tool
                    under `torchrun --nproc-per-node=N -m titan.tools.generate ...`
Only rank 0 prints and writes.
Exit status: 0 done, 2 bad arguments, prompts file or unreadable checkpoint.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from titan.config.errors import ConfigError
from titan.interop.errors import ConversionError
from titan.tools.args import UsageError, parse_key_values, tool_main

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class GenerateArgs:
    checkpoint: str = ""
    prompt: str = ""
    prompt_ids: Optional[str] = None
    model: Optional[str] = None
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    seed: int = 0
    num_samples: int = 1
    bos: bool = True
    stop_at_eos: bool = True
    device: str = "cpu"
    dtype: str = "float32"
    tokenizer_kind: Optional[str] = None
    tokenizer_path: Optional[str] = None
    chat: bool = False
    chat_template: Optional[str] = None
    prompts: Optional[str] = None
    out: Optional[str] = None
    batch_size: int = 8
    tp: int = -1
    nproc_per_node: int = 1


ALIASES = {"parallel.tp": "tp", "parallel.nproc_per_node": "nproc_per_node"}  # the training CLI's names


def parse_args(argv: Sequence[str]) -> GenerateArgs:
    args = parse_key_values(argv, GenerateArgs, aliases=ALIASES)
    if not args.checkpoint:
        raise UsageError("checkpoint=PATH is required")
    if args.dtype not in DTYPES:
        raise UsageError(f"dtype={args.dtype!r}: one of {', '.join(DTYPES)}")
    if args.max_new_tokens < 1 or args.num_samples < 1 or args.batch_size < 1:
        raise UsageError("max_new_tokens, num_samples and batch_size must be >= 1")
    if args.prompts is not None and (args.prompt or args.prompt_ids is not None or args.num_samples > 1):
        raise UsageError("prompts=FILE replaces prompt / prompt_ids (and num_samples): give one or the other")
    if args.out is not None and args.prompts is None:
        raise UsageError("out=FILE writes the results of prompts=FILE; add prompts=FILE")
    if args.nproc_per_node < 1 or args.tp == 0 or args.tp < -1:
        raise UsageError("parallel.nproc_per_node must be >= 1 and parallel.tp >= 1 (or -1: every process)")
    return args


def _tokenizer(args: GenerateArgs, loaded):
    """The run's tokenizer (lazily imported: prompt_ids runs never need one)."""
    from omegaconf import OmegaConf

    from titan.config.schema import TokenizerConfig
    from titan.data import build_tokenizer

    section = (loaded.run_config() or {}).get("tokenizer") or {}
    overrides = {k: v for k, v in (("kind", args.tokenizer_kind), ("path", args.tokenizer_path)) if v is not None}
    if not section and not overrides:
        raise UsageError(f"{loaded.path}: no run config to take the tokenizer from; set tokenizer_kind/tokenizer_path or pass prompt_ids")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TokenizerConfig), section, overrides))
    return build_tokenizer(cfg)


def _messages(prompt: str) -> list:
    """A chat prompt: a JSON list of {role, content} messages, or one user message."""
    import json

    text = prompt.strip()
    if not text.startswith("["):
        return [{"role": "user", "content": prompt}]
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"prompt looks like a JSON message list but is not valid JSON ({e.msg})") from None


def _encoder(args: GenerateArgs, loaded, tokenizer):
    """prompt (text, or a message list with chat=true) -> ids, as training framed them: BOS,
    then the text, or the conversation rendered by the chat template up to the assistant's turn."""
    from titan.data.chat import build_chat_template, encode_text

    if not args.chat:
        return lambda prompt: ([tokenizer.bos_id] if args.bos else []) + tokenizer.encode(prompt)
    config = loaded.run_config() or {}
    choice = args.chat_template or (config.get("data") or {}).get("chat_template")
    template = build_chat_template(choice, args.tokenizer_path or (config.get("tokenizer") or {}).get("path"))
    return lambda prompt: [tokenizer.bos_id] + encode_text(tokenizer, template.prompt(_messages(prompt) if isinstance(prompt, str) else prompt))


def _check_vocab(ids: list[int], vocab_size: int) -> None:
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise UsageError(f"token ids {bad[:5]} are outside the model's vocabulary of {vocab_size}")


def _load(args: GenerateArgs, tp_mesh=None):
    from titan.generate import load_model, tensor_parallel

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and tp_mesh is not None:
        device = torch.device("cuda", torch.cuda.current_device())
    parallelize = tensor_parallel(tp_mesh) if tp_mesh is not None else None
    return load_model(args.checkpoint, preset=args.model, device=device, dtype=DTYPES[args.dtype], parallelize=parallelize)


def run(args: GenerateArgs, tp_mesh=None) -> list[str]:
    """Generate and return one printable result per sample (a JSON line per prompt for
    `prompts`). `tp_mesh`: shard the model over it (every rank calls this alike)."""
    from titan.generate import generate

    if args.prompts is not None:
        from titan.tools.prompt_file import read_prompts

        prompts = read_prompts(args.prompts, args.chat)  # before the (slow) load: errors first
        model, loaded = _load(args, tp_mesh)
        return run_prompts(args, model, loaded, prompts)
    model, loaded = _load(args, tp_mesh)
    tokenizer = None
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t]
        except ValueError:
            raise UsageError(f"prompt_ids={args.prompt_ids!r}: expected comma-separated integers") from None
    else:
        tokenizer = _tokenizer(args, loaded)
        ids = _encoder(args, loaded, tokenizer)(args.prompt)
    _check_vocab(ids, loaded.args.vocab_size)
    eos = tokenizer.eos_id if tokenizer is not None and args.stop_at_eos else None
    prompt = torch.tensor([ids] * args.num_samples)
    out = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, eos_id=eos)
    results = []
    for row in out.tolist():
        new = row[len(ids):]
        if eos is not None and eos in new:
            new = new[:new.index(eos)]
        if tokenizer is None:
            results.append(" ".join(map(str, row)))
        elif args.chat:  # the assistant's reply only, without its end-of-turn marker
            results.append(tokenizer.decode(new).split("<|eot_id|>")[0].strip())
        else:  # decode prompt and continuation together, so the seam keeps its spacing
            results.append(tokenizer.decode(ids[1 if args.bos else 0:] + new))
    return results


def _completion(args: GenerateArgs, tokenizer, ids: list[int], new: list[int]) -> str:
    if args.chat:  # the assistant's reply only, without its end-of-turn marker
        return tokenizer.decode(new).split("<|eot_id|>")[0].strip()
    shown = ids[1:] if args.bos else ids  # decoded with the prompt, so the seam keeps its spacing
    prompt_text, whole = tokenizer.decode(shown), tokenizer.decode(shown + new)
    return whole[len(prompt_text):] if whole.startswith(prompt_text) else tokenizer.decode(new)


def run_prompts(args: GenerateArgs, model, loaded, prompts: list) -> list[str]:
    """Each prompt of a prompts file, `batch_size` at a time: one JSON line per prompt."""
    import json

    from titan.generate import generate_batch

    tokenizer = _tokenizer(args, loaded)
    encode = _encoder(args, loaded, tokenizer)
    eos = tokenizer.eos_id if args.stop_at_eos else None
    lines = []
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start:start + args.batch_size]
        ids = [encode(p) for p in batch]
        for row in ids:
            _check_vocab(row, loaded.args.vocab_size)
        news = generate_batch(model, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, eos_id=eos)
        for prompt, row, new in zip(batch, ids, news):
            record = {"prompt": prompt, "completion": _completion(args, tokenizer, row, new),
                      "prompt_tokens": len(row), "completion_tokens": len(new)}
            lines.append(json.dumps(record, ensure_ascii=False))
    return lines


def _report(args: GenerateArgs, results: list[str]) -> None:
    if args.out is not None:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("".join(line + "\n" for line in results), encoding="utf-8")
        print(f"wrote {len(results)} completions to {args.out}")
        return
    for i, text in enumerate(results):
        if len(results) > 1 and args.prompts is None:
            print(f"--- sample {i}")
        print(text)


def run_rank(args: GenerateArgs) -> int:
    """This process's part: alone, or one rank of a tensor-parallel world (torchrun's or ours,
    from the environment). Only rank 0 prints and writes; exit status as `main`'s."""
    from titan.tools.generate_dist import rank_world, tp_world

    from titan.tools.prompt_file import PromptFileError

    rank, world = rank_world()
    try:
        with tp_world(args, rank, world) as tp_mesh:
            results = run(args, tp_mesh)
    except (UsageError, ConversionError, ConfigError, PromptFileError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        _report(args, results)
    return 0


def _generate(argv: list[str]) -> int:
    from titan.tools.generate_dist import needs_self_launch, self_launch

    args = parse_args(argv)
    if needs_self_launch(args):
        return self_launch(args)
    return run_rank(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return tool_main(argv, __doc__, _generate)


if __name__ == "__main__":
    sys.exit(main())
