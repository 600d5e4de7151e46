"""Plan a run before launching it: per-rank memory, communication, FLOPs and a fits verdict.

    python -m titan.tools.plan model=llama3_70b parallel.tp=8 parallel.pp=4 world_size=512 \\
        device_memory_gib=80 activation_checkpoint=full training.seq_len=8192 [--json]

Every argument that is not one of the planner's own keys is a Hydra override of the training
config (same `train` root and presets as `python -m titan.train`). The planner's keys:

    world_size=N           ranks in the job (default: parallel.nproc_per_node when a degree
                           is -1, else the product of the degrees)
    device_memory_gib=G    memory per device (default 80)
    headroom=F             share of device memory kept free (default 0.1)
    peak_tflops=T          device peak for the step-time estimate (default logging.peak_tflops,
                           else 989, H100 dense bf16)
    mfu=F                  assumed model FLOPs utilisation (default 0.4)
    --json                 machine-readable output

Exit status: 0 the worst rank fits, 3 it does not, 2 config error.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

from titan.config.errors import ConfigError

EXIT_FITS, EXIT_CONFIG, EXIT_DOES_NOT_FIT = 0, 2, 3
PLANNER_KEYS = {"world_size": int, "device_memory_gib": float, "headroom": float, "peak_tflops": float, "mfu": float}


def split_argv(argv: list[str]) -> tuple[dict, list[str], bool]:
    """(planner options, Hydra overrides, --json)."""
    options, overrides, as_json = {}, [], False
    for arg in argv:
        key, eq, value = arg.partition("=")
        if arg == "--json":
            as_json = True
        elif eq and key in PLANNER_KEYS:
            try:
                options[key] = PLANNER_KEYS[key](value)
            except ValueError:
                raise ConfigError(key, f"{value!r} is not a {PLANNER_KEYS[key].__name__}") from None
        else:
            overrides.append(arg)
    return options, overrides, as_json


def compose(overrides: list[str], config_dir: Optional[str] = None):
    """Typed TrainConfig from the same Hydra root as training (no run dir, no job)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from titan.config.load import CONF_DIR, register_schemas, to_typed

    register_schemas()
    try:
        with initialize_config_dir(str(config_dir or CONF_DIR), version_base="1.3"):
            cfg = hydra_compose("train", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError("overrides", str(e).splitlines()[0]) from None
    return to_typed(cfg)


def _gib(x: float) -> str:
    return f"{x / 2**30:10.2f}"


def _size(x: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} B"


def format_plan(p) -> str:
    lay = p.layout
    lines = [
        f"{p.model}: {p.n_params:,} parameters ({p.n_params / 1e9:.2f}B)"
        + (f", {p.active_params:,} active per token ({p.active_params / 1e9:.2f}B)" if p.active_params and p.active_params != p.n_params else ""),
        f"layout: world {p.world_size} = pp {lay['pp']} x dp_replicate {lay['dp_replicate']} x dp_shard {lay['dp_shard']}"
        f" x cp {lay['cp']} x tp {lay['tp']} ({'FSDP' if lay['fsdp'] else 'no FSDP'})"
        + (f"; ep {lay['ep']} of dp_shard (routed experts / ep, FSDP over dp_shard / ep)" if lay.get("ep", 1) > 1 else ""),
        f"batch: seq_len {p.seq_len}, micro-batch {p.micro_batch_size}, global {p.global_batch_size}, "
        f"accumulation {p.accum_steps}, pp micro-batches {p.pp_microbatches}; "
        f"{p.tokens_per_microbatch:,.0f} tokens per rank per forward",
        "",
    ]
    shown = sorted({0, p.worst.pp_rank, len(p.ranks) - 1})
    ranks = [p.ranks[i] for i in shown]
    header = "memory per rank (GiB)".ljust(34) + "".join(f"{'pp' + str(r.pp_rank):>10}" for r in ranks)
    rows = [
        ("layers held", lambda r: f"{r.layers:>10}"),
        ("parameters (fp32)", lambda r: _gib(r.params)),
        ("optimizer states", lambda r: _gib(r.optim_states)),
        ("at the backward peak:", lambda r: f"{r.backward_moment:>10}"),
        ("  gradients allocated", lambda r: _gib(r.grads_during_backward)),
        ("  FSDP gathered parameters", lambda r: _gib(r.fsdp_buffers)),
        ("  weight copies (DDP / autocast)", lambda r: _gib(r.compute_copies)),
        ("  saved activations", lambda r: _gib(r.activations)),
        ("    micro-batches in flight", lambda r: f"{r.in_flight:>10.2f}"),
        ("  backward working set", lambda r: _gib(r.working)),
        ("  = backward peak", lambda r: _gib(r.backward_peak)),
        ("at the optimizer step:", lambda r: " " * 10),
        ("  gradients (fp32)", lambda r: _gib(r.grads)),
        ("  optimizer temporaries", lambda r: _gib(r.optim_step)),
        ("  = optimizer-step peak", lambda r: _gib(r.optimizer_peak)),
        ("PEAK", lambda r: _gib(r.peak)),
    ]
    lines.append(header)
    for name, cell in rows:
        lines.append(f"  {name}".ljust(34) + "".join(cell(r) for r in ranks))
    lines.append("")

    w = p.worst
    verdict = "FITS" if p.fits else "DOES NOT FIT"
    lines.append(
        f"verdict: {verdict}: peak {_size(w.peak)} on pp rank {w.pp_rank} ({w.peak_phase}) vs "
        f"{_size(p.usable_memory)} usable ({p.device_memory / 2**30:g} GiB, {p.headroom:.0%} headroom)"
    )
    lines.append("biggest consumers: " + ", ".join(f"{k} {_size(v)}" for k, v in w.consumers()[:4]))
    lines.append("")
    lines.append(f"one block, one micro-batch, saved for backward: {_size(p.per_layer_activation)}")
    for k, v in p.activation_detail.items():
        lines.append(f"  {k}".ljust(40) + f"{_size(v):>12}")
    lines.append("")
    lines.append("communication per optimizer step, sent per rank:")
    for k, v in p.communication.items():
        lines.append(f"  {k}".ljust(48) + f"{_size(v):>12}")
    if not p.communication:
        lines.append("  none (one rank)")
    lines.append("")
    lines.append(
        f"compute: {p.flops_per_token / 1e9:.2f} GFLOP/token, {p.flops_per_step / 1e15:.3f} PFLOP/step; "
        f"at {p.mfu:.0%} MFU of {p.peak_tflops:g} TFLOP/s: {p.step_time_s:.3f} s/step, "
        f"{p.tokens_per_s:,.0f} tokens/s ({p.tokens_per_s / p.world_size:,.0f} per device)"
    )
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        options, overrides, as_json = split_argv(argv)
        from titan.plan import plan

        result = plan(compose(overrides), **options)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(format_plan(result))
    return EXIT_FITS if result.fits else EXIT_DOES_NOT_FIT


if __name__ == "__main__":
    sys.exit(main())
