"""A titan model as an lm-evaluation-harness language model, on any training layout.

lm-eval splits each task's documents over `world_size` ranks by `rank`: here those are the
*data-parallel* rank and degree, so tensor-parallel peers (same dp rank) receive the same
requests and step together, and every data-parallel rank scores its own share. Nothing is
gathered to one rank: FSDP all-gathers one block at a time inside the forward, as in training.
Because FSDP's forward is a collective over the data-parallel ranks, every rank runs the same
number of forwards (their counts are agreed, and short ranks run padding batches).

Tokenization follows lm-eval's Hugging Face backend with `add_bos_token=True` (BOS, then the
text): the BOS framing titan trains with, and scores that equal `hf` on an exported model.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch.distributed.tensor import DTensor


def _full(t: torch.Tensor) -> torch.Tensor:
    """Plain tensor of the model's output (vocab-parallel logits are DTensors under TP)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _has_dtensor_params(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


class TitanLM(TemplateLM):
    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_length: int, *, batch_size: int = 8,
                 max_gen_tokens: int = 64, device: torch.device | str = "cpu", dp_rank: int = 0, dp_world: int = 1,
                 dp_group: Optional[dist.ProcessGroup] = None, pad_multiple: int = 1,
                 forward_context: Optional[Any] = None):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self._max_length, self.batch_size, self.max_gen_tokens = max_length, batch_size, max_gen_tokens
        self._device = torch.device(device)
        self._rank, self._world_size, self.dp_group = dp_rank, dp_world, dp_group
        self.pad_multiple = pad_multiple  # sequence lengths a layout accepts (tp x cp with sequence parallel)
        self.forward_context = forward_context or contextlib.nullcontext

    # ---- what lm-eval asks of a model ----------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        bos = [self.tokenizer.bos_id] if add_special_tokens is not False else []
        return bos + self.tokenizer.encode(string)

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    # ---- distributed primitives lm-eval's evaluator calls (over the data-parallel group) ---
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._world_size == 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor, group=self.dp_group)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> Optional[list]:
        if self._world_size == 1:
            return [obj]
        out: list = [None] * self._world_size
        dist.all_gather_object(out, obj, group=self.dp_group)  # every dp rank may need the scores
        return out if self._rank == dst else None

    def barrier(self) -> None:
        if self._world_size > 1:
            dist.barrier(group=self.dp_group)

    def _agree_max(self, n: int) -> int:
        """The largest `n` over every rank of the job (forward counts must match under FSDP)."""
        if not dist.is_initialized():
            return n
        t = torch.tensor(n, device=self._device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    # ---- scoring ---------------------------------------------------------------------------
    @torch.no_grad()
    def _logits(self, rows: list[list[int]]) -> torch.Tensor:
        """Log-probabilities (batch, seq, vocab) of right-padded rows (causal: padding after a
        row's tokens cannot change them)."""
        width = max(len(r) for r in rows)
        width = -(-width // self.pad_multiple) * self.pad_multiple
        batch = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            batch[i, : len(r)] = torch.tensor(r)
        with self.forward_context():
            logits = _full(self.model(batch.to(self._device)))
        return F.log_softmax(logits.float(), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        # Longest first: batches of similar length waste little padding; answers go back in order.
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        for b in range(self._agree_max(len(batches))):
            if b >= len(batches):  # padding: keep FSDP's collectives in step with the other ranks
                self._logits([[self.prefix_token_id] * self.pad_multiple])
                continue
            rows, spans = [], []
            for i in batches[b]:
                _, context, continuation = requests[i]
                whole = (context + continuation)[-(self.max_length + 1):]
                rows.append(whole[:-1])
                spans.append((len(whole) - 1 - len(continuation), continuation))
            logprobs = self._logits(rows)
            for row, i, (start, continuation) in zip(range(len(rows)), batches[b], spans):
                lp = logprobs[row, start : start + len(continuation)]
                target = torch.tensor(continuation, device=lp.device)
                score = float(lp.gather(-1, target[:, None]).sum())
                greedy = bool((lp.argmax(-1) == target).all())
                results[i] = (score, greedy)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood, in windows of max_length tokens (each token predicted once)."""
        windows, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            tokens = self.tokenizer.encode(text)
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (score, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[n] += score
        return totals

    # ---- generation ------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first stop string. A plain (or FSDP-sharded) model
        decodes with titan's KV cache; a tensor-parallel one recomputes each step in lockstep."""
        if _has_dtensor_params(self.model) and not _fsdp_only(self.model):
            return self._generate_lockstep(requests)
        with _unsharded(self.model):
            return [self._generate_cached(*req.args) for req in requests]

    def _prompt(self, context: str, max_new: int) -> list[int]:
        return self.tok_encode(context)[-max(self.max_length - max_new, 1):]

    @staticmethod
    def _settings(kwargs: dict, default_max: int) -> tuple[list[str], int]:
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        return until, min(int(kwargs.get("max_gen_toks", default_max)), default_max)

    def _cut(self, text: str, until: list[str]) -> str:
        for stop in until:
            if stop and stop in text:
                text = text[: text.index(stop)]
        return text

    @torch.no_grad()
    def _generate_cached(self, context: str, kwargs: dict) -> str:
        from titan.generate import CachedDecoder

        until, max_new = self._settings(kwargs, self.max_gen_tokens)
        prompt = self._prompt(context, max_new)
        decoder = CachedDecoder(self.model, len(prompt) + max_new)
        cache = decoder.new_cache(1)
        logits = decoder(torch.tensor([prompt], device=self._device), cache)[:, -1]
        new: list[int] = []
        for _ in range(max_new):
            token = int(logits.argmax(-1))
            if token == self.eot_token_id:
                break
            new.append(token)
            if any(s and s in self.tok_decode(new) for s in until) or len(new) == max_new:
                break
            logits = decoder(torch.tensor([[token]], device=self._device), cache)[:, -1]
        return self._cut(self.tok_decode(new), until)

    @torch.no_grad()
    def _generate_lockstep(self, requests) -> list[str]:
        """Full-sequence forwards, a fixed number per request on every rank (the model's
        collectives must stay in step); stop strings are applied afterwards."""
        out = []
        steps = self.max_gen_tokens
        for r in range(self._agree_max(len(requests))):
            context, kwargs = requests[r].args if r < len(requests) else ("", {})
            until, max_new = self._settings(kwargs, steps)
            tokens = self._prompt(context, max_new)
            new: list[int] = []
            for _ in range(steps):  # always `steps` forwards, whatever was generated
                token = int(self._logits([tokens + new])[0, len(tokens) + len(new) - 1].argmax())
                if len(new) < max_new and (not new or new[-1] != self.eot_token_id):
                    new.append(token)
            if r < len(requests):
                new = new[: new.index(self.eot_token_id)] if self.eot_token_id in new else new
                out.append(self._cut(self.tok_decode(new), until))
        return out


def _fsdp_only(model: torch.nn.Module) -> bool:
    """Sharded by FSDP alone (no tensor parallelism): unsharding yields plain parameters."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return False
    return all("tp" not in (p.device_mesh.mesh_dim_names or ()) for p in model.parameters() if isinstance(p, DTensor))


@contextlib.contextmanager
def _unsharded(model: torch.nn.Module):
    """FSDP: all-gather every sharded module's parameters for the duration (generation calls
    submodules directly, past FSDP's forward hooks); no-op for a plain model."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
