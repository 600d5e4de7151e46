"""A tiny Llama3 with every parameter random (norm weights too), for conversion/generation tests.

Random norm weights matter: with the all-ones init, swapping two norms in a name map would go
unnoticed."""

from __future__ import annotations

import dataclasses

import torch

from titan.models.llama3 import Llama3, LlamaArgs

TINY = LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32,
                 rope_theta=10000.0, max_seq_len=64)


def tiny_args(**changes) -> LlamaArgs:
    return dataclasses.replace(TINY, **changes)


@torch.no_grad()
def random_llama(args: LlamaArgs, seed: int = 0) -> Llama3:
    torch.manual_seed(seed)
    model = Llama3(args)
    for name, p in model.named_parameters():  # a tied output is the embedding: filled once
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.2 * torch.randn_like(p))
        else:
            p.copy_(torch.randn_like(p) * (0.5 if "embeddings" in name else 0.15))
    return model.eval()
