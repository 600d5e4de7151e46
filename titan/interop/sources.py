"""Find model weights and their architecture from whatever path a user gives.

Accepted sources: a titan run dir (its latest complete checkpoint; args from `.hydra/config.yaml`),
a DCP checkpoint dir (args from `titan_model.json` beside it, else from the run dir above it, else
from a named preset), a Hugging Face dir (config.json), or a `torch.save` file (needs a preset).
A preset's `vocab_size: -1` is filled from the embedding's shape, and every tensor's shape is
checked against the args, so a wrong preset fails with the offending name rather than later.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from titan.checkpoint import CheckpointError, resolve_checkpoint
from titan.config.paths import CONF_DIR
from titan.config.schema import ModelConfig
from titan.interop.dcp_io import (
    METADATA_FILE,
    load_dcp_model_state,
    load_torch,
    read_saved_args,
)
from titan.interop.errors import ConversionError
from titan.interop.safetensors_io import CONFIG_FILE, load_hf
from titan.models import build_model, model_args
from titan.models.llama3 import LlamaArgs

PRESET_DIR = CONF_DIR / "model"
HYDRA_CONFIG = Path(".hydra") / "config.yaml"


@dataclass
class LoadedWeights:
    state_dict: dict[str, torch.Tensor]  # titan names
    args: LlamaArgs
    kind: str  # "dcp" | "hf" | "torch"
    path: Path  # the checkpoint dir or file actually read
    run_dir: Optional[Path] = None  # the training run it came from, when known

    def run_config(self) -> Optional[dict[str, Any]]:
        """The run's resolved `.hydra/config.yaml` (for the tokenizer section), if any."""
        return read_run_config(self.run_dir) if self.run_dir else None


def read_run_config(run_dir: Path, sections: Optional[tuple[str, ...]] = None) -> dict[str, Any]:
    """The run's resolved config, or only `sections` of it (others may hold interpolations,
    e.g. a sweep launcher's `${now:...}`, that resolve only inside Hydra)."""
    from omegaconf import OmegaConf

    path = run_dir / HYDRA_CONFIG
    try:
        cfg = OmegaConf.load(path)
        if sections is not None:
            cfg = OmegaConf.create({k: cfg[k] for k in sections if k in cfg})
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:
        raise ConversionError(f"{path}: cannot read the run's config ({type(e).__name__}: {e})") from e


def _model_config(values: dict[str, Any], where: str) -> ModelConfig:
    """Validate a `model:` mapping against the schema (types, unknown keys)."""
    from omegaconf import OmegaConf

    try:
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), values)
        return OmegaConf.to_object(merged)
    except Exception as e:
        raise ConversionError(f"{where}: not a valid model config ({type(e).__name__}: {e})") from e


def preset_config(name: str) -> ModelConfig:
    """A `conf/model/NAME.yaml` preset, or a YAML file given by path."""
    from omegaconf import OmegaConf

    path = Path(name) if name.endswith((".yaml", ".yml")) else PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConversionError(f"no model preset {name!r} (known: {', '.join(known) or 'none'})")
    return _model_config(OmegaConf.to_container(OmegaConf.load(path), resolve=True), str(path))


def _vocab_from(state_dict: dict[str, torch.Tensor]) -> int:
    if "tok_embeddings.weight" not in state_dict:
        raise ConversionError("the weights have no tok_embeddings.weight: not a titan Llama state dict")
    return state_dict["tok_embeddings.weight"].shape[0]


def check_shapes(state_dict: dict[str, torch.Tensor], args: LlamaArgs, source: str) -> None:
    """Every tensor present and shaped as `args` says; the error names the first misfit."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(args).state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    if missing or extra:
        raise ConversionError(f"{source}: weights do not fit the model args (missing {missing[:3]}, "
                              f"unexpected {extra[:3]}); wrong model preset?")
    for name, shape in expected.items():
        if tuple(state_dict[name].shape) != shape:
            raise ConversionError(f"{source}: {name} has shape {tuple(state_dict[name].shape)} but the model "
                                  f"args give {shape}; wrong model preset?")


def _find_run_dir(path: Path) -> Optional[Path]:
    for candidate in (path, *path.parents[:3]):
        if (candidate / HYDRA_CONFIG).is_file():
            return candidate
    return None


def saved_args(ckpt: Path, vocab: int, run_dir: Optional[Path] = None):
    """The architecture a titan checkpoint was saved with: `titan_model.json` beside it, else
    its run's `.hydra/config.yaml` (`vocab` fills a `vocab_size: -1`); None when neither exists."""
    saved = read_saved_args(ckpt) if ckpt.is_dir() else None
    if saved is not None:
        return saved
    run_dir = run_dir or _find_run_dir(ckpt)
    if run_dir is None:
        return None
    config = read_run_config(run_dir, sections=("model", "training"))
    seq_len = (config.get("training") or {}).get("seq_len", LlamaArgs.max_seq_len)
    return model_args(_model_config(config.get("model") or {}, str(run_dir / HYDRA_CONFIG)), vocab, seq_len)


def _args_for_titan_weights(state_dict, ckpt: Path, run_dir: Optional[Path], preset: Optional[str]) -> LlamaArgs:
    vocab = _vocab_from(state_dict)
    if preset:
        args = model_args(preset_config(preset), vocab, LlamaArgs.max_seq_len)
    else:
        args = saved_args(ckpt, vocab, run_dir) if ckpt.is_dir() or run_dir is not None else None
    if args is None:
        raise ConversionError(f"{ckpt}: cannot tell the model architecture (no run config or "
                              f"titan_model.json beside it); name a preset, e.g. --model llama3_debug")
    if args.tie_embeddings and "output.weight" not in state_dict:
        state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
    check_shapes(state_dict, args, str(ckpt))
    return args


def load_weights(src: str | Path, preset: Optional[str] = None) -> LoadedWeights:
    """Weights (titan names) and architecture from any supported source; see the module doc."""
    src = Path(src)
    if not src.exists():
        raise ConversionError(f"{src}: no such file or directory")
    if src.is_file():
        sd = load_torch(src)
        return LoadedWeights(sd, _args_for_titan_weights(sd, src, None, preset), "torch", src)
    if (src / CONFIG_FILE).is_file():
        sd, args = load_hf(src)
        if preset:
            raise ConversionError(f"{src} is a Hugging Face dir: its config.json gives the model; drop the preset")
        check_shapes(sd, args, str(src))
        return LoadedWeights(sd, args, "hf", src)
    if (src / METADATA_FILE).is_file():
        ckpt = src  # load_dcp_model_state refuses it when incomplete, naming it
    else:
        try:
            ckpt = resolve_checkpoint(src)
        except CheckpointError as e:
            raise ConversionError(f"{src}: not a run dir, checkpoint, Hugging Face dir or weights file ({e})") from e
    sd = load_dcp_model_state(ckpt)
    run_dir = _find_run_dir(ckpt)
    args = _args_for_titan_weights(sd, ckpt, run_dir, preset)
    return LoadedWeights(sd, args, "dcp", ckpt, run_dir)


def initial_weights(spec: str, args: LlamaArgs) -> dict[str, torch.Tensor]:
    """Full (unsharded, CPU) weights for `checkpoint.initial_load`: 'hf:PATH' for a Hugging Face
    dir, else a DCP checkpoint dir or a run dir (its latest complete checkpoint). Checked
    against the args the trainer built, so a mismatch fails before any training step."""
    if spec.startswith("hf:"):
        from titan.interop.compat import require_same_model

        state_dict, hf_args = load_hf(spec[3:])
        # Shapes cannot see RoPE, norm eps or tying: compare the configs themselves first.
        require_same_model(hf_args, args, f"checkpoint.initial_load={spec}")
    else:
        from titan.interop.compat import require_same_model

        ckpt = initial_load_checkpoint(spec)
        state_dict = load_dcp_model_state(ckpt)
        saved = saved_args(ckpt, _vocab_from(state_dict))
        if saved is not None:  # as for hf: what the weights were trained as vs this run's model
            require_same_model(saved, args, f"checkpoint.initial_load={spec}")
    if args.tie_embeddings and "output.weight" not in state_dict and "tok_embeddings.weight" in state_dict:
        state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
    check_shapes(state_dict, args, f"checkpoint.initial_load={spec}")
    return state_dict


def initial_load_checkpoint(spec: str) -> Path:
    """The DCP checkpoint dir `checkpoint.initial_load=spec` names: itself, or a run's latest."""
    path = Path(spec)
    if (path / METADATA_FILE).is_file():
        return path
    try:
        return resolve_checkpoint(path)
    except CheckpointError as e:
        raise ConversionError(f"checkpoint.initial_load={spec}: {e}") from e
