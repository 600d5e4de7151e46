"""titan's loop vs a bare PyTorch loop on the same model, measured side by side in one process.

    python benchmarks/overhead.py [--steps 30] [--rounds 3] [overrides ...]

The bare loop is the minimum any trainer must do: forward, cross-entropy, backward, AdamW step,
on pre-made random tokens. titan's loop adds what a real run needs: tokenising and packing real
text, gradient clipping (a global norm), the LR schedule, metrics (tokens/s, MFU, memory) and
metrics.jsonl. Rounds alternate the two so machine noise hits both; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from titan.config.load import CONF_DIR, register_schemas, to_typed
from titan.config.validate import validate
from titan.models import build_model, model_args
from titan.train.env import setup_rank
from titan.train.trainer import Trainer


def titan_config(overrides: list[str], steps: int, run_dir: str):
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        dc = compose(config_name="train", overrides=overrides)
    cfg = to_typed(dc)
    cfg.training.steps, cfg.training.val_interval = steps, 0
    cfg.lr_schedule.warmup_steps = min(cfg.lr_schedule.warmup_steps, steps - 1)
    cfg.logging.interval, cfg.checkpoint.interval, cfg.run_dir = 1, 0, run_dir
    validate(cfg, world_size=1)
    return cfg


def bare_step_times(cfg, vocab: int, steps: int) -> list[float]:
    torch.manual_seed(cfg.training.seed)
    args = model_args(cfg.model, vocab, cfg.training.seq_len)
    model = build_model(args)
    model.to_empty(device="cpu")
    model.init_weights(seed=cfg.training.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    b, s = cfg.training.global_batch_size, cfg.training.seq_len
    tokens = torch.randint(0, vocab, (steps + 1, b, s + 1))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        logits = model(tokens[i, :, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[i, :, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times[1:]  # the first step pays one-off allocation costs


def titan_tokens_per_sec(cfg) -> list[float]:
    env = setup_rank(cfg)
    trainer = Trainer(cfg, env)
    trainer.fit()
    records = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_sec"] for r in records if "loss" in r][1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", default=[])
    opts = parser.parse_args()
    bare, titan = [], []
    for r in range(opts.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = titan_config(opts.overrides, opts.steps, tmp)
            titan += titan_tokens_per_sec(cfg)
            vocab = cfg.model.vocab_size if cfg.model.vocab_size > 0 else cfg.tokenizer.vocab_size
        tokens = cfg.training.global_batch_size * cfg.training.seq_len
        bare += [tokens / t for t in bare_step_times(cfg, vocab, opts.steps)]
        print(f"round {r + 1}: bare {statistics.median(bare):,.0f} tok/s, titan {statistics.median(titan):,.0f} tok/s")
    b, t = statistics.median(bare), statistics.median(titan)
    print(f"\nmodel {cfg.model.name}, batch {cfg.training.global_batch_size} x seq {cfg.training.seq_len}, "
          f"{torch.get_num_threads()} threads, {opts.rounds} rounds x {opts.steps} steps")
    print(f"| loop | median tokens/s |\n|---|---|\n| bare PyTorch | {b:,.0f} |\n| titan | {t:,.0f} |")
    print(f"titan / bare = {t / b:.3f}  (overhead {100 * (1 - t / b):+.1f}%)")


if __name__ == "__main__":
    main()
