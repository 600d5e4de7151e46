"""Moving weights between titan checkpoints and other formats (Hugging Face, torch.save)."""

from titan.interop.dcp_io import (
    CheckpointReadError,
    load_dcp_model_state,
    load_torch,
    save_dcp_model,
    save_torch,
)
from titan.interop.errors import ConversionError
from titan.interop.hf import args_from_hf_config, from_hf, hf_config, to_hf
from titan.interop.safetensors_io import load_hf, save_hf
from titan.interop.sources import LoadedWeights, initial_weights, load_weights

__all__ = [
    "CheckpointReadError",
    "ConversionError",
    "LoadedWeights",
    "args_from_hf_config",
    "from_hf",
    "hf_config",
    "initial_weights",
    "load_dcp_model_state",
    "load_hf",
    "load_torch",
    "load_weights",
    "save_dcp_model",
    "save_hf",
    "save_torch",
    "to_hf",
]
