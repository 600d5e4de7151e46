"""Score a checkpoint on lm-evaluation-harness tasks.

    python -m titan.tools.eval checkpoint=RUN_DIR tasks=[titan_choice,titan_copy] limit=100
    python -m titan.tools.eval checkpoint=hf:RUN_DIR/hf tasks=[hellaswag,arc_easy]
    torchrun --nproc-per-node 2 -m titan.tools.eval checkpoint=RUN_DIR tasks=[...]   # FSDP x 2

Arguments are key=value. Keys:
    checkpoint      run dir (latest complete checkpoint), DCP checkpoint dir, hf:PATH or a Hugging
                    Face dir, or a torch.save file (with model=PRESET) (required)
    tasks           [a,b] or a,b: lm-eval task names; titan's offline tasks: titan_choice, titan_copy
    limit           examples per task (default: all);  num_fewshot (default: the task's)
    batch_size 8;   max_length (default: the run's training.seq_len, else 2048);  max_gen_tokens 64
    out             JSON results file (default: RUN_DIR/eval/results.json, else ./eval_results.json)
    wandb           true: also log the scores to W&B (offline without a key);  project titan
    model           preset for weights without a config;  device cpu|cuda|auto;  dtype float32|bfloat16
    tokenizer_kind, tokenizer_path   override the run's tokenizer; a Hugging Face dir without a
                    titan run config uses its own tokenizer (AutoTokenizer)
    include_path    more lm-eval task YAML dirs;  seed 1234
Under torchrun every rank holds a shard of the model (FSDP over all ranks) and scores its share of
the requests. Exit status: 0 done, 2 bad arguments or unreadable checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from titan.tools.args import UsageError, parse_key_values, tool_main
from titan.tools.generate import DTYPES


@dataclass
class EvalArgs:
    checkpoint: str = ""
    tasks: str = ""
    limit: Optional[int] = None
    num_fewshot: Optional[int] = None
    batch_size: int = 8
    max_length: Optional[int] = None
    max_gen_tokens: int = 64
    out: Optional[str] = None
    wandb: bool = False
    project: str = "titan"
    model: Optional[str] = None
    device: str = "cpu"
    dtype: str = "float32"
    tokenizer_kind: Optional[str] = None
    tokenizer_path: Optional[str] = None
    include_path: Optional[str] = None
    seed: int = 1234
    task_list: list = field(default_factory=list)


def parse_args(argv: Sequence[str]) -> EvalArgs:
    args = parse_key_values(argv, EvalArgs, internal=("task_list",))
    args.task_list = [t.strip() for t in args.tasks.strip("[]").split(",") if t.strip()]
    if not args.checkpoint:
        raise UsageError("checkpoint=PATH is required")
    if not args.task_list:
        raise UsageError("tasks=[...] is required, e.g. tasks=[titan_choice,titan_copy]")
    if args.dtype not in DTYPES:
        raise UsageError(f"dtype={args.dtype!r}: one of {', '.join(DTYPES)}")
    if args.limit is not None and args.limit < 1:
        raise UsageError("limit must be >= 1")
    return args


class HFTokenizer:
    """A Hugging Face tokenizer behind titan's Tokenizer interface (encode never adds BOS)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.vocab_size = len(self.tok)
        self.bos_id, self.eos_id = self.tok.bos_token_id, self.tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))


def _tokenizer(args: EvalArgs, loaded):
    from titan.tools.generate import GenerateArgs
    from titan.tools.generate import _tokenizer as run_tokenizer

    from titan.interop.sources import HYDRA_CONFIG

    if loaded.kind == "hf" and loaded.run_dir is None and (loaded.path.parent / HYDRA_CONFIG).is_file():
        loaded.run_dir = loaded.path.parent  # RUN_DIR/hf, exported by checkpoint.export_hf: the run's tokenizer
    has_config = bool(loaded.run_config()) or args.tokenizer_kind or args.tokenizer_path
    if loaded.kind == "hf" and not has_config:
        return HFTokenizer(str(loaded.path))
    return run_tokenizer(GenerateArgs(tokenizer_kind=args.tokenizer_kind, tokenizer_path=args.tokenizer_path), loaded)


def _source(checkpoint: str) -> str:
    return checkpoint[3:] if checkpoint.startswith("hf:") else checkpoint


def _distributed(device: str) -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo")
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def build_lm(args: EvalArgs):
    """(TitanLM, LoadedWeights): the weights on this rank (sharded by FSDP under torchrun)."""
    from titan.eval.lm import TitanLM
    from titan.interop.sources import load_weights
    from titan.models.llama3 import Llama3

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = _distributed(device)
    loaded = load_weights(_source(args.checkpoint), preset=args.model)
    with torch.device("meta"):
        model = Llama3(loaded.args)
    model.load_state_dict(loaded.state_dict, assign=True)
    model.init_buffers(torch.device("cpu"))
    model.tie_weights()
    model = model.to(device=device, dtype=DTYPES[args.dtype]).eval()
    if world > 1:  # each rank keeps its shard; forwards all-gather one block at a time
        from torch.distributed.device_mesh import init_device_mesh

        from titan.parallel.fsdp import apply_fsdp

        apply_fsdp(model, init_device_mesh(device, (world,)), param_dtype=DTYPES[args.dtype], reduce_dtype=DTYPES[args.dtype])
    tokenizer = _tokenizer(args, loaded)  # also finds the run of an exported RUN_DIR/hf
    config = loaded.run_config() or {}
    # No longer than the model's RoPE table (the context it was built for).
    max_length = min(args.max_length or (config.get("training") or {}).get("seq_len") or 2048, loaded.args.max_seq_len)
    lm = TitanLM(model, tokenizer, int(max_length), batch_size=args.batch_size,
                 max_gen_tokens=args.max_gen_tokens, device=device, dp_rank=rank, dp_world=world)
    return lm, loaded


def format_table(scores: dict[str, dict[str, float]]) -> str:
    rows = [(task, metric, value) for task, metrics in sorted(scores.items()) for metric, value in sorted(metrics.items())
            if not metric.endswith("_stderr")]
    width = max([len("task")] + [len(r[0]) for r in rows])
    lines = [f"{'task':<{width}}  {'metric':<12}  value", f"{'-' * width}  {'-' * 12}  ------"]
    lines += [f"{task:<{width}}  {metric:<12}  {value:.4f}" for task, metric, value in rows]
    return "\n".join(lines)


def _out_path(args: EvalArgs, loaded) -> Path:
    if args.out:
        return Path(args.out)
    return loaded.run_dir / "eval" / "results.json" if loaded.run_dir else Path("eval_results.json")


def _log_wandb(args: EvalArgs, scores: dict[str, dict[str, float]], out: Path) -> None:
    import wandb

    from titan.eval.harness import flat_scores

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    run = wandb.init(project=args.project, job_type="eval", name=f"eval:{Path(_source(args.checkpoint)).name}",
                     config={"checkpoint": args.checkpoint, "tasks": args.task_list, "limit": args.limit},
                     dir=str(out.parent), mode=mode, settings=wandb.Settings(silent=True, console="off"))
    try:
        flat = flat_scores(scores)
        run.log(flat)
        run.summary.update(flat)
        table = wandb.Table(columns=["task", "metric", "value"],
                            data=[[t, m, v] for t, ms in scores.items() for m, v in ms.items()])
        run.log({"eval/results": table})
    finally:
        run.finish()


def run(args: EvalArgs) -> Optional[dict[str, dict[str, float]]]:
    """Scores on rank 0 (None elsewhere); writes the JSON file and, if asked, W&B."""
    from lm_eval.utils import handle_non_serializable

    from titan.eval.harness import evaluate

    lm, loaded = build_lm(args)
    scores, results = evaluate(lm, args.task_list, args.limit, args.num_fewshot, args.include_path, args.seed)
    if lm.rank != 0 or (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0):
        return None
    out = _out_path(args, loaded)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"checkpoint": args.checkpoint, "weights": str(loaded.path), "scores": scores,
               "limit": args.limit, "lm_eval": {k: (results or {}).get(k) for k in ("results", "versions", "n-shot")}}
    out.write_text(json.dumps(payload, indent=2, default=handle_non_serializable) + "\n")
    if args.wandb:
        _log_wandb(args, scores, out)
    return scores


def _print_scores(argv: list[str]) -> int:
    try:
        scores = run(parse_args(argv))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if scores is not None:
        print(format_table(scores))
        if not scores:
            print("no task could be evaluated (see the lines above)", file=sys.stderr)
            return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return tool_main(argv, __doc__, _print_scores)


if __name__ == "__main__":
    sys.exit(main())
