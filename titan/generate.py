"""Autoregressive generation with a KV cache, reusing a trained `Llama3`'s modules as they are.

The training model recomputes the whole sequence each call. `CachedDecoder` walks the same
submodules (norms, wq/wk/wv/wo, feed-forward, output) but keeps each layer's keys and values, so
each new token costs one position of work; RoPE is applied at the token's absolute position
from a table sized for prompt + new tokens (independent of the training sequence length).

Tensor parallel: the decoder takes the number of heads from the projections' outputs
(`view(..., -1, head_dim)`) and sizes each layer's cache from the first keys it sees, so with
training's TP plan (column-sharded wq/wk/wv with local outputs, row-sharded wo) each rank
caches only its local heads. `load_model(parallelize=tensor_parallel(mesh))` applies it; every
rank must pass the same prompt and seed, so that all draw the same tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from titan.models.llama3 import (
    Attention,
    Llama3,
    TransformerBlock,
    rope_table,
)
from titan.sampling import sample_next


class KVCache:
    """Keys and values of every layer for positions [0, length), (batch, max_len, kv_heads, head_dim)."""

    def __init__(self, n_layers: int, batch: int, max_len: int):
        self.batch = batch
        self.max_len = max_len
        self.length = 0
        self.keys: list[Optional[torch.Tensor]] = [None] * n_layers
        self.values: list[Optional[torch.Tensor]] = [None] * n_layers

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (batch, seq, kv_heads, head_dim) at positions start.., return all keys/values so far."""
        end = start + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to fill up to {end}")
        if self.keys[layer] is None:  # sized on first use: the (local) head count comes from k
            # (value heads may be narrower than key heads: latent attention)
            self.keys[layer] = k.new_zeros((self.batch, self.max_len, *k.shape[2:]))
            self.values[layer] = v.new_zeros((self.batch, self.max_len, *v.shape[2:]))
        self.keys[layer][:, start:end] = k
        self.values[layer][:, start:end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]


def _cached_attention(attn: Attention, x: torch.Tensor, rope: torch.Tensor, cache: KVCache, layer: int, start: int,
                      mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    bsz, seq, _ = x.shape
    q, k, v = attn.qkv(x)  # a family's own projections (e.g. Qwen3's QK-norm) included
    q, k = attn.rotate(q, k, rope)
    keys, values = cache.update(layer, start, k, v)
    repeats = q.shape[2] // keys.shape[2]
    if repeats > 1:  # grouped-query attention
        keys = keys.repeat_interleave(repeats, dim=2)
        values = values.repeat_interleave(repeats, dim=2)
    if mask is None and seq > 1:  # new query i (absolute position start + i) sees keys 0 .. start + i
        q_pos = torch.arange(start, start + seq, device=x.device)
        mask = torch.arange(start + seq, device=x.device)[None, :] <= q_pos[:, None]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask)
    return attn.wo(out.transpose(1, 2).reshape(bsz, seq, -1))


def _cached_block(block: TransformerBlock, x: torch.Tensor, rope: torch.Tensor, cache: KVCache, layer: int, start: int,
                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    h = x + _cached_attention(block.attention, block.attention_norm(x), rope, cache, layer, start, mask)
    return h + block.feed_forward(block.ffn_norm(h))


class CachedDecoder:
    """Incremental forward over a trained `Llama3` (its weights, not copies)."""

    def __init__(self, model: Llama3, max_len: int):
        self.model = model
        self.max_len = max_len
        device = model.tok_embeddings.weight.device
        self.rope = rope_table(dataclasses.replace(model.args, max_seq_len=max_len), device=device)

    def new_cache(self, batch: int) -> KVCache:
        return KVCache(len(self.model.layers), batch, self.max_len)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, cache: KVCache, pad: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (batch, seq, vocab) for `tokens` placed at slots cache.length.., which are cached.

        `pad` (batch,): row i is left-padded with pad[i] slots. Its tokens then sit at RoPE
        positions slot - pad[i] and never attend to the padding, so each row computes what it
        would alone (a padding slot attends to itself only: finite, and never looked at)."""
        start, seq = cache.length, tokens.shape[1]
        if start + seq > min(self.max_len, cache.max_len):
            raise ValueError(f"KV cache holds {cache.max_len} positions; asked to fill up to {start + seq}")
        m = self.model
        h = m.tok_embeddings(tokens)
        mask = None
        if pad is None:
            rope = self.rope[start:start + seq]
        else:
            slots = torch.arange(start, start + seq, device=tokens.device)
            rope = self.rope[(slots[None] - pad[:, None]).clamp(min=0)]  # (batch, seq, pairs, 2)
            keys = torch.arange(start + seq, device=tokens.device)
            causal = keys[None, :] <= slots[:, None]
            visible = (keys[None, None, :] >= pad[:, None, None]) | (keys[None, None, :] == slots[None, :, None])
            mask = (causal[None] & visible)[:, None]  # (batch, 1, seq, keys): broadcast over heads
        for i, block in enumerate(m.layers.values()):
            h = _cached_block(block, h, rope, cache, i, start, mask)
        cache.length = start + seq
        return m.output(m.norm(h))

    __call__ = forward


@torch.no_grad()
def generate(model: Llama3, prompt: torch.Tensor | Sequence[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None, eos_id: Optional[int] = None,
             on_token: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
    """Prompt ids (seq,) or (batch, seq) of equal lengths -> (batch, seq + new) ids.

    temperature 0 is greedy; otherwise sampling after top-k (0: off) and top-p (1: off) filtering,
    reproducible for a given `seed`. A sequence that emits `eos_id` is padded with it until every
    sequence has, then generation stops. `on_token` sees each new (batch,) step, for streaming."""
    device = model.tok_embeddings.weight.device
    tokens = torch.as_tensor(prompt, dtype=torch.long, device=device)
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token (e.g. BOS)")
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.initial_seed())
    sample = lambda logits: sample_next(logits, temperature, top_k, top_p, generator)
    return _decode(model, tokens, None, max_new_tokens, sample, eos_id, on_token)


@torch.no_grad()
def generate_batch(model: Llama3, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
                   top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None,
                   eos_id: Optional[int] = None) -> list[list[int]]:
    """Prompts of any lengths, decoded together (left-padded); returns each prompt's new ids,
    cut after `eos_id` (excluded). Each row samples from its own generator seeded with `seed`,
    so every prompt gets the tokens `generate(model, prompt, ..., seed=seed)` gives it alone,
    whatever else is in the batch."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    device = model.tok_embeddings.weight.device
    width = max(len(p) for p in prompts)
    pad = torch.tensor([width - len(p) for p in prompts], device=device)
    tokens = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    generators = []
    if temperature > 0:
        for _ in prompts:
            generators.append(torch.Generator(device=device))
            generators[-1].manual_seed(seed if seed is not None else torch.initial_seed())

    def sample(logits: torch.Tensor) -> torch.Tensor:
        if not generators:
            return sample_next(logits, temperature, top_k, top_p)
        return torch.cat([sample_next(logits[i:i + 1], temperature, top_k, top_p, g) for i, g in enumerate(generators)])

    out = _decode(model, tokens, pad, max_new_tokens, sample, eos_id, None)[:, width:].tolist()
    return [row[:row.index(eos_id)] if eos_id in row else row for row in out]


def _decode(model: Llama3, tokens: torch.Tensor, pad: Optional[torch.Tensor], max_new_tokens: int,
            sample: Callable[[torch.Tensor], torch.Tensor], eos_id: Optional[int],
            on_token: Optional[Callable[[torch.Tensor], None]]) -> torch.Tensor:
    """Prefill `tokens` (batch, seq) in one pass, then one token per step: (batch, seq + new)."""
    device = tokens.device
    decoder = CachedDecoder(model, tokens.shape[1] + max_new_tokens)
    cache = decoder.new_cache(tokens.shape[0])
    logits = decoder(tokens, cache, pad)[:, -1]
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=device)
    out = [tokens]
    for step in range(max_new_tokens):
        next_ids = sample(logits)
        if eos_id is not None:
            next_ids = next_ids.masked_fill(finished, eos_id)
            finished |= next_ids == eos_id
        out.append(next_ids[:, None])
        if on_token is not None:
            on_token(next_ids)
        if step + 1 == max_new_tokens or (eos_id is not None and bool(finished.all())):
            break
        logits = decoder(next_ids[:, None], cache, pad)[:, -1]
    return torch.cat(out, dim=1)


def tensor_parallel(tp_mesh) -> Callable[[Llama3], Llama3]:
    """The `load_model(parallelize=...)` hook for TP generation: training's TP plan with a
    replicated residual stream and full (replicated) logits for the sampler."""
    from titan.parallel.tp import apply_tp

    return lambda model: apply_tp(model, tp_mesh, sequence_parallel=False, loss_parallel=False)


def load_model(src: str, preset: Optional[str] = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32,
               parallelize: Optional[Callable[[Llama3], Llama3]] = None):
    """(eval-mode Llama3 holding the weights of `src`, LoadedWeights); `src` as in
    `titan.interop.load_weights`. `parallelize` (e.g. `tensor_parallel(mesh)`) runs before the move
    to `device`."""
    from titan.finetune.lora import load_lora_checkpoint
    from titan.interop.sources import load_weights

    # A LoRA run's checkpoint holds adapters only: merged into its base (the run's initial_load).
    loaded = load_lora_checkpoint(src, None, preset) or load_weights(src, preset=preset)
    with torch.device("meta"):
        model = Llama3(loaded.args)
    model.load_state_dict(loaded.state_dict, assign=True)  # no copy; the tie comes from the state dict
    model.init_buffers(torch.device("cpu"))
    if parallelize is not None:
        model = parallelize(model)
    model = model.to(device=device, dtype=dtype).eval()
    if loaded.args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model, loaded
