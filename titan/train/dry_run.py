"""`training.dry_run=true`: build the model on the meta device and report its size and cost."""

from __future__ import annotations

from titan.config.schema import TrainConfig
from titan.models import active_params, build_model, count_params, flops_per_token, model_args


def dry_run(cfg: TrainConfig) -> dict:
    vocab = cfg.model.vocab_size if cfg.model.vocab_size > 0 else cfg.tokenizer.vocab_size
    args = model_args(cfg.model, vocab, cfg.training.seq_len)
    model = build_model(args)  # meta: no memory is allocated
    n_params = count_params(model)
    n_active = active_params(args, n_params)
    flops = flops_per_token(args, n_params, cfg.training.seq_len)  # from the active parameters
    tokens_per_step = cfg.training.global_batch_size * cfg.training.seq_len
    report = {"model": cfg.model.name, "params": n_params, "active_params": n_active, "flops_per_token": flops, "flops_per_step": flops * tokens_per_step}
    active = f" ({n_active:,} active per token, {n_active / 1e9:.2f}B)" if n_active != n_params else ""
    print(
        f"{cfg.model.name}: {n_params:,} parameters ({n_params / 1e9:.2f}B){active}, "
        f"{flops / 1e9:.2f} GFLOP/token training at seq_len {cfg.training.seq_len} "
        f"({report['flops_per_step'] / 1e12:.2f} TFLOP per step of {tokens_per_step:,} tokens); "
        "built on the meta device, nothing allocated"
    )
    return report
