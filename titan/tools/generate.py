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
Exit status: 0 done, 2 bad arguments or unreadable checkpoint.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

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


def parse_args(argv: Sequence[str]) -> GenerateArgs:
    args = parse_key_values(argv, GenerateArgs)
    if not args.checkpoint:
        raise UsageError("checkpoint=PATH is required")
    if args.dtype not in DTYPES:
        raise UsageError(f"dtype={args.dtype!r}: one of {', '.join(DTYPES)}")
    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise UsageError("max_new_tokens and num_samples must be >= 1")
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


def _chat_prompt_ids(args: GenerateArgs, loaded, tokenizer) -> list[int]:
    """The conversation so far, rendered by the chat template up to the assistant's turn."""
    import json

    from titan.data.chat import build_chat_template, encode_text

    config = loaded.run_config() or {}
    choice = args.chat_template or (config.get("data") or {}).get("chat_template")
    template = build_chat_template(choice, args.tokenizer_path or (config.get("tokenizer") or {}).get("path"))
    text = args.prompt.strip()
    if text.startswith("["):
        try:
            messages = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"prompt looks like a JSON message list but is not valid JSON ({e.msg})") from None
    else:
        messages = [{"role": "user", "content": args.prompt}]
    return encode_text(tokenizer, template.prompt(messages))


def run(args: GenerateArgs) -> list[str]:
    """Generate and return one printable result per sample."""
    from titan.generate import generate, load_model

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, loaded = load_model(args.checkpoint, preset=args.model, device=device, dtype=DTYPES[args.dtype])
    tokenizer = None
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t]
        except ValueError:
            raise UsageError(f"prompt_ids={args.prompt_ids!r}: expected comma-separated integers") from None
    elif args.chat:
        tokenizer = _tokenizer(args, loaded)
        ids = [tokenizer.bos_id] + _chat_prompt_ids(args, loaded, tokenizer)
    else:
        tokenizer = _tokenizer(args, loaded)
        ids = ([tokenizer.bos_id] if args.bos else []) + tokenizer.encode(args.prompt)
    bad = [i for i in ids if not 0 <= i < loaded.args.vocab_size]
    if bad:
        raise UsageError(f"token ids {bad[:5]} are outside the model's vocabulary of {loaded.args.vocab_size}")
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


def _print_samples(argv: list[str]) -> int:
    results = run(parse_args(argv))
    for i, text in enumerate(results):
        if len(results) > 1:
            print(f"--- sample {i}")
        print(text)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return tool_main(argv, __doc__, _print_samples)


if __name__ == "__main__":
    sys.exit(main())
