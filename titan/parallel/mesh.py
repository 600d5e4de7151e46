"""Parallel layout: degrees from the config, checks before launch, and the device mesh.

Mesh dims, outermost first: pp, dp_replicate, dp_shard, cp, tp. tp is innermost so its
ranks are neighbours (same host, fastest links); every dim is kept, even of size 1, so code
can always slice `mesh["tp"]` etc. Flattened dims built on top:

  dp           dp_replicate x dp_shard       data loading: ranks that read different batches
  dp_shard_cp  dp_shard x cp                 what FSDP shards parameters over
  dp_cp        dp_replicate x dp_shard x cp  ranks whose gradients / losses are averaged
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from titan.config.errors import ConfigError
from titan.parallel.context_parallel import validate_cp
from titan.config.schema import ParallelConfig

DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
FLAT_DIMS = {
    "dp": ("dp_replicate", "dp_shard"),
    "dp_shard_cp": ("dp_shard", "cp"),
    "dp_cp": ("dp_replicate", "dp_shard", "cp"),
}


def resolve_degrees(cfg: ParallelConfig, world_size: int) -> dict[str, int]:
    """Degree per mesh dim (in DIMS order); the one -1, if any, takes what is left."""
    given = {d: getattr(cfg, d) for d in DIMS}
    for d, v in given.items():
        if v == 0 or v < -1:
            raise ConfigError(f"parallel.{d}", f"{v} is not a degree; use a positive integer or -1 (the rest)")
    free = [d for d, v in given.items() if v == -1]
    if len(free) > 1:
        raise ConfigError(
            f"parallel.{free[1]}",
            f"only one degree may be -1, got {', '.join(free)}; give all but one explicitly",
        )
    fixed = math.prod(v for v in given.values() if v != -1)
    if free:
        if world_size % fixed:
            raise ConfigError(
                f"parallel.{free[0]}",
                f"-1 cannot fill world size {world_size}: the other degrees multiply to {fixed}, "
                f"which does not divide it; change parallel.nproc_per_node or the other degrees",
            )
        given[free[0]] = world_size // fixed
    elif fixed != world_size:
        shown = " x ".join(f"{d}={v}" for d, v in given.items())
        raise ConfigError(
            "parallel",
            f"{shown} = {fixed} ranks, but the world size is {world_size}; make the product match "
            f"(or set one degree, usually parallel.dp_shard, to -1)",
        )
    return given


def _cuda_run(cfg) -> bool:
    device = getattr(cfg.training.device, "value", cfg.training.device)
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def validate_layout(cfg, world_size: int) -> None:
    """Raise ConfigError for a layout that cannot work; pure and fast (no process group).

    `cfg` is the whole TrainConfig: the layout constrains model sizes and batch sizes too."""
    p, m, t = cfg.parallel, cfg.model, cfg.training
    deg = resolve_degrees(p, world_size)
    tp, cp, pp = deg["tp"], deg["cp"], deg["pp"]
    dp = deg["dp_replicate"] * deg["dp_shard"]

    if not p.fsdp and deg["dp_shard"] > 1:
        raise ConfigError(
            "parallel.fsdp",
            f"fsdp=false cannot shard over dp_shard={deg['dp_shard']}; set parallel.fsdp=true, "
            "or replicate instead (parallel.dp_replicate=-1 parallel.dp_shard=1, i.e. parallel=ddp)",
        )
    if not p.fsdp and cp > 1:
        raise ConfigError("parallel.fsdp", "context parallelism shards parameters over dp_shard x cp with FSDP; set parallel.fsdp=true")
    if p.cpu_offload and deg["dp_shard"] * cp == 1:
        raise ConfigError(
            "parallel.cpu_offload",
            "offloads FSDP2's shards, and this layout shards nothing (dp_shard x cp = 1); "
            "use an FSDP layout (e.g. parallel=fsdp) or set parallel.cpu_offload=false",
        )

    if m.mla.kv_lora_rank > 0 and tp * cp > 1:
        raise ConfigError("parallel.tp" if tp > 1 else "parallel.cp", "multi-head latent attention (model.mla) has no tensor / context parallel plan yet; set parallel.tp=1 and parallel.cp=1")
    if tp > 1:
        kv = m.n_kv_heads or m.n_heads
        for key, value in (("model.n_heads", m.n_heads), ("model.n_kv_heads", kv)):
            if value % tp:
                raise ConfigError(key, f"{value} is not divisible by parallel.tp={tp}; pick a tp that divides it")
        moe = m.moe.num_experts > 0
        if not moe or m.moe.n_dense_layers > 0:  # dense FFNs are split over tp
            hidden, key = (m.ffn_hidden, "model.ffn_hidden") if m.ffn_hidden else (_ffn_hidden(m), "model.multiple_of")
            if hidden % tp:
                raise ConfigError(key, f"FFN hidden size {hidden} is not divisible by parallel.tp={tp}")
        if moe and (m.moe.expert_hidden * m.moe.n_shared_experts) % tp:  # routed experts are not (see parallel.ep)
            raise ConfigError("model.moe.expert_hidden", f"shared experts' hidden size {m.moe.expert_hidden * m.moe.n_shared_experts} is not divisible by parallel.tp={tp}")
        if m.vocab_size > 0 and m.vocab_size % tp:
            raise ConfigError("model.vocab_size", f"{m.vocab_size} is not divisible by parallel.tp={tp} (vocab-parallel embedding and loss)")
        if p.sequence_parallel and t.seq_len % (tp * cp):
            raise ConfigError(
                "training.seq_len",
                f"{t.seq_len} must be divisible by parallel.tp x parallel.cp = {tp * cp} with sequence parallelism; "
                "change the length or set parallel.sequence_parallel=false",
            )
    if p.async_tp:
        if not _cuda_run(cfg):
            raise ConfigError("parallel.async_tp", "async TP needs CUDA + NCCL (symmetric memory); set parallel.async_tp=false on CPU")
        if tp == 1:
            raise ConfigError("parallel.async_tp", "async TP overlaps tensor-parallel collectives; it needs parallel.tp > 1")
        compile_mode = getattr(cfg.compile.mode, "value", cfg.compile.mode)
        if compile_mode == "off":
            raise ConfigError("parallel.async_tp", "async TP is a torch.compile pass; set compile.mode=block or model")
    from titan.parallel.expert import validate_ep

    validate_ep(cfg, deg)  # ep borrows from dp_shard
    validate_cp(t.seq_len, cp)  # load balancing splits the sequence into 2 x cp chunks
    if pp > 1:  # schedule vs. stages per rank, layer split, microbatch count, untied embedding
        from titan.parallel.pipeline import validate_pipeline

        validate_pipeline(cfg, pp, dp)
    if t.global_batch_size % (dp * t.micro_batch_size):
        raise ConfigError(
            "training.global_batch_size",
            f"{t.global_batch_size} sequences must split evenly into dp={dp} ranks x micro_batch_size="
            f"{t.micro_batch_size}; use a multiple of {dp * t.micro_batch_size}",
        )


def _ffn_hidden(m) -> int:
    from titan.models.llama3 import LlamaArgs

    return LlamaArgs(dim=m.dim, multiple_of=m.multiple_of, ffn_dim_multiplier=m.ffn_dim_multiplier).ffn_hidden


class ParallelMesh:
    """The world mesh (every dim of DIMS, even of size 1) plus the flattened dims, all from
    one root so DTensors on them compose (FSDP x TP). `mesh[name]` gives any of them;
    `data_parallel` is what FSDP / DDP get: (dp_replicate, dp_shard_cp) for HSDP, else 1-D."""

    def __init__(self, degrees: dict[str, int], device_type: str):
        from torch.distributed.device_mesh import init_device_mesh

        self.degrees = dict(degrees)
        self.device_type = device_type
        self.world = init_device_mesh(device_type, tuple(degrees[d] for d in DIMS), mesh_dim_names=DIMS)
        # Flattened meshes are kept here: slicing them back out of the root is deprecated.
        self._flat = {name: self.world[dims]._flatten(name) for name, dims in FLAT_DIMS.items()}
        if degrees["dp_replicate"] > 1:
            shard = degrees["dp_shard"] * degrees["cp"]
            self.data_parallel = self._flat["dp_cp"]._unflatten(
                0, (degrees["dp_replicate"], shard), ("dp_replicate", "dp_shard_cp")
            )
            if shard == 1:  # replicate only (DDP)
                self.data_parallel = self.data_parallel["dp_replicate"]
        else:
            self.data_parallel = self._flat["dp_shard_cp"]

    def __getitem__(self, name: str):
        return self._flat[name] if name in self._flat else self.world[name]

    def size(self, name: str) -> int:
        return self.degrees[name] if name in self.degrees else self._flat[name].size()


def build_mesh(degrees: dict[str, int], device_type: str) -> Optional[ParallelMesh]:
    """The job's meshes; None for a single process (nothing to build)."""
    if math.prod(degrees.values()) == 1:
        return None
    return ParallelMesh(degrees, device_type)


def dim_size(mesh: Optional[ParallelMesh], name: str) -> int:
    return 1 if mesh is None else mesh.size(name)


def dp_rank_and_world(mesh: Optional[ParallelMesh]) -> tuple[int, int]:
    """This rank's data shard and the number of shards (ranks reading different batches)."""
    if mesh is None:
        return 0, 1
    dp = mesh["dp"]
    return dp.get_local_rank(), dp.size()


def group_of(mesh: Optional[ParallelMesh], name: str) -> Optional["torch.distributed.ProcessGroup"]:
    """Process group of a mesh dim, or None when the dim has a single rank."""
    if mesh is None or mesh.size(name) == 1:
        return None
    return mesh[name].get_group()
