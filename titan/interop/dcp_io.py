"""Reading model weights out of DCP checkpoints in one process, and single-file exports.

A training checkpoint holds `TrainState.state_dict()`: {"step", "model", "optim",
"lr_scheduler", "data", "rng"}; conversion and generation need only "model". DCP reads without
a process group (`no_dist`), and reshards whatever layout the run saved (FSDP shards, TP
slices) into whole tensors.

Two safety details: DCP's `.metadata` is a pickle, which `pickle.load` would let run code, so it
is read with an unpickler that only builds DCP's own metadata classes; and tensor data goes
through `torch.load(weights_only=True)` (DCP's reader already does that).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.futures import Future

from titan.checkpoint import COMPLETE
from titan.interop.errors import CheckpointReadError, ConversionError
from titan.models.llama3 import LlamaArgs

METADATA_FILE = ".metadata"
ARGS_FILE = "titan_model.json"  # LlamaArgs of a model-only checkpoint written by `save_dcp_model`

_SAFE_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_SAFE_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata (dataclasses, torch.Size, dtypes) and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _SAFE_MODULES or (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


def read_dcp_metadata(ckpt_dir: Path) -> Metadata:
    path = ckpt_dir / METADATA_FILE
    if not path.is_file():
        raise CheckpointReadError(ckpt_dir, f"not a DCP checkpoint (no {METADATA_FILE})")
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except Exception as e:
        raise CheckpointReadError(path, f"cannot read checkpoint metadata (truncated or corrupted?): {e}") from e
    if not isinstance(metadata, Metadata):
        raise CheckpointReadError(path, f"holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeFileReader(FileSystemReader):
    """DCP's reader, fed the safely read metadata, reading one data file at a time so that a
    failure can name the file (DCP itself reports only a per-rank exception)."""

    def __init__(self, path: Path, metadata: Metadata):
        super().__init__(str(path))
        self._metadata = metadata
        self.failed: Optional[tuple[Path, BaseException]] = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if getattr(self._metadata, "storage_meta", None) is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata

    def read_data(self, plan, planner) -> Future:
        by_file: dict[str, list] = {}
        for item in plan.items:
            by_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for relative_path, items in by_file.items():
            try:
                super().read_data(dataclasses.replace(plan, items=items), planner).wait()
            except Exception as e:
                self.failed = (Path(self.path) / relative_path, e)
                raise
        done: Future = Future()
        done.set_result(None)
        return done


def load_dcp_model_state(ckpt_dir: str | os.PathLike, section: str = "model") -> dict[str, torch.Tensor]:
    """The `section` tensors of a complete DCP checkpoint as whole CPU tensors, keyed without the
    section prefix. Single process; no process group needed."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointReadError(ckpt_dir, "no such checkpoint directory")
    if not (ckpt_dir / COMPLETE).is_file():
        raise CheckpointReadError(ckpt_dir, f"incomplete checkpoint (no {COMPLETE} marker): its save was interrupted")
    metadata = read_dcp_metadata(ckpt_dir)
    prefix = section + "."
    template = {
        fqn[len(prefix):]: torch.empty(md.size, dtype=md.properties.dtype)
        for fqn, md in metadata.state_dict_metadata.items()
        if fqn.startswith(prefix) and isinstance(md, TensorStorageMetadata)
    }
    if not template:
        raise CheckpointReadError(ckpt_dir, f"no {section!r} tensors in this checkpoint")
    reader = SafeFileReader(ckpt_dir, metadata)
    state = {section: template}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
            warnings.simplefilter("ignore")
            dcp.load(state, storage_reader=reader, no_dist=True)
    except (Exception, CheckpointException) as e:  # DCP's exception derives from BaseException
        if reader.failed is not None:
            path, cause = reader.failed
            raise CheckpointReadError(path, f"cannot read checkpoint data (truncated or corrupted?): "
                                            f"{type(cause).__name__}: {_first_line(cause)}") from e
        raise CheckpointReadError(ckpt_dir, f"cannot load checkpoint: {type(e).__name__}: {_first_line(e)}") from e
    return state[section]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def save_dcp_model(out_dir: str | os.PathLike, state_dict: dict[str, torch.Tensor], args: Optional[LlamaArgs] = None) -> Path:
    """A model-only DCP checkpoint {"model": state_dict} with the `.complete` marker, usable as
    `checkpoint.initial_load`; `args` (if given) go to `titan_model.json` beside it, so the
    checkpoint can be read back without naming a preset."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConversionError(f"{out_dir} exists and is not empty; refusing to mix checkpoints")
    out_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": dict(state_dict)}, checkpoint_id=str(out_dir), no_dist=True)
    if args is not None:
        from titan.models.registry import family_of

        saved = {"family": family_of(args).name, **dataclasses.asdict(args)}
        (out_dir / ARGS_FILE).write_text(json.dumps(saved, indent=2) + "\n")
    (out_dir / COMPLETE).write_text("converted\n")  # last: the checkpoint is whole
    return out_dir


def read_saved_args(ckpt_dir: Path) -> Optional[LlamaArgs]:
    """The model args written by `save_dcp_model`, if any (files without a family: Llama 3)."""
    from titan.config.errors import ConfigError
    from titan.models.registry import get_family

    path = ckpt_dir / ARGS_FILE
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text())
        return _dataclass_from(get_family(values.pop("family", "llama3")).args_class, values)
    except (ValueError, TypeError, AttributeError, ConfigError) as e:
        raise CheckpointReadError(path, f"bad model args ({e})") from e


def _dataclass_from(cls: type, values: dict[str, Any]) -> Any:
    """`cls(**values)` with nested dataclass fields (e.g. Qwen3Args.moe) rebuilt from their dicts."""
    import typing

    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        kinds = typing.get_args(hints.get(name)) or (hints.get(name),)
        nested = next((k for k in kinds if dataclasses.is_dataclass(k)), None)
        if nested is not None and isinstance(value, dict):
            values[name] = _dataclass_from(nested, value)
    return cls(**values)


def save_torch(path: str | os.PathLike, state_dict: dict[str, torch.Tensor]) -> Path:
    """One `torch.save` file of the state dict (plain CPU tensors, written atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, tmp)
    os.replace(tmp, path)
    return path


def load_torch(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict saved by `save_torch` (or a {"model": state_dict} file); never runs code."""
    path = Path(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointReadError(path, "file is missing") from e
    except Exception as e:
        raise CheckpointReadError(path, f"cannot read (truncated, corrupted, or not a weights file?): "
                                        f"{type(e).__name__}: {_first_line(e)}") from e
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointReadError(path, "does not hold a state dict of tensors")
    return loaded
