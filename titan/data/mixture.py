"""Weighted data mixtures (`data.mix`): token stores and on-the-fly sources, one global stream.

Each source i has its own stream of windows (a store's windows, or the packed on-the-fly
stream of its documents). The mixture's global window k is window j of source s(k), where the
schedule s is periodic: weights become exact fractions n_i / P (denominators up to 1000), and one
period of P windows is laid out by smooth weighted round robin, so every period holds exactly
n_i windows of source i and every prefix is within one window of its ideal share. Since
j = count_i(k) = (k // P) * n_i + prefix_i(k mod P) is a closed form, the mixture is
deterministic, independent of the layout, and resumes from k alone (plus, for on-the-fly
sources, their stream positions, which advance by whole global batches on every rank alike).
A rank reads only its own windows from store sources; on-the-fly sources cost what they cost
without a mixture.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Optional

import numpy as np
import torch

from titan.config.errors import ConfigError
from titan.data.loader import GlobalBatchLoader, TokenLoader


def schedule(weights: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(source of each window in one period, prefix counts of shape (P + 1, n_sources))."""
    total = sum(weights)
    shares = [Fraction(w / total).limit_denominator(1000) for w in weights]
    period = math.lcm(*(s.denominator for s in shares))
    counts = [int(s * period) for s in shares]
    counts[int(np.argmax(weights))] += period - sum(counts)  # rounding leftovers
    credit = [0] * len(counts)
    assign = np.empty(period, dtype=np.int64)
    for k in range(period):
        credit = [c + n for c, n in zip(credit, counts)]
        i = max(range(len(counts)), key=lambda x: (credit[x], -x))
        credit[i] -= period
        assign[k] = i
    prefix = np.zeros((period + 1, len(counts)), dtype=np.int64)
    for k in range(period):
        prefix[k + 1] = prefix[k]
        prefix[k + 1, assign[k]] += 1
    return assign, prefix


class StoreWindows:
    """Random access to a store split's windows (shuffled per epoch like StoreLoader)."""

    sequential = False

    def __init__(self, split, seq_len: int, seed: int, shuffle: bool):
        from titan.data.store_loader import StoreLoader

        self._loader = StoreLoader(split, seq_len, 1, 1, seed=seed, shuffle=shuffle)

    def window(self, j: int) -> np.ndarray:
        return self._loader.tokens.read(self._loader._window_start(j), self._loader.window)


class StreamWindows:
    """The packed windows of on-the-fly documents, produced in order."""

    sequential = True

    def __init__(self, docs, tokenizer, seq_len: int, seed: int, shuffle: bool):
        self._loader = TokenLoader(docs, tokenizer, seq_len, 1, 1, seed=seed, shuffle=shuffle)
        self.position = 0  # windows produced so far

    def window(self, j: int) -> np.ndarray:
        if j < self.position:
            raise RuntimeError(f"window {j} of an on-the-fly source was already passed")
        while self.position <= j:
            inputs, labels = self._loader.next_batch()
            self.position += 1
        return torch.cat([inputs[0], labels[0, -1:]]).numpy()

    def advance_to(self, j: int) -> None:
        while self.position < j:
            self._loader.next_batch()
            self.position += 1

    def state(self) -> dict[str, int]:
        s = self._loader.state_dict()
        return {"position": self.position, "epoch": s["epoch"], "document": s["document"],
                "token_offset": s["token_offset"]}

    def load(self, state: dict[str, int]) -> None:
        self._loader.load_state_dict({**self._loader.state_dict(), "epoch": state["epoch"],
                                      "document": state["document"],
                                      "token_offset": state["token_offset"], "micro_index": 0})
        self.position = state["position"]


class MixtureLoader(GlobalBatchLoader):
    """Packed micro-batches for one data-parallel rank from a weighted mixture of sources."""

    def __init__(self, sources: list[tuple[str, Any]], weights: list[float], seq_len: int,
                 global_batch_size: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_world: int = 1, seed: int = 0):
        super().__init__(seq_len, global_batch_size, micro_batch_size, dp_rank, dp_world, seed)
        self.names = [name for name, _ in sources]
        self.sources = [src for _, src in sources]
        self.assign, self.prefix = schedule(weights)
        self.period = len(self.assign)
        self._next_window = 0
        self._batch_start: tuple[int, dict] = (0, self._stream_states())

    def count(self, i: int, k: int) -> int:
        """Windows of source i among global windows [0, k)."""
        q, r = divmod(k, self.period)
        return q * int(self.prefix[-1, i]) + int(self.prefix[r, i])

    def _stream_states(self) -> dict[str, int]:
        return {f"source{i}.{key}": value for i, src in enumerate(self.sources) if src.sequential
                for key, value in src.state().items()}

    def _next_global_batch(self) -> bool:
        self._batch_start = (self._next_window, self._stream_states())
        first = self._next_window + self.dp_rank * self.local_batch_size
        rows = []
        for k in range(first, first + self.local_batch_size):
            i = int(self.assign[k % self.period])
            rows.append(self.sources[i].window(self.count(i, k)))
        self._next_window += self.global_batch_size
        for i, src in enumerate(self.sources):  # same stream positions on every rank
            if src.sequential:
                src.advance_to(self.count(i, self._next_window))
        self._set_windows(np.stack(rows))
        return True  # every source repeats its epochs: the mixture never ends

    def state_dict(self) -> dict[str, Any]:
        if self._mid_step():
            window, streams = self._batch_start
        else:
            window, streams = self._next_window, self._stream_states()
        return {"window": window, **self._step_state(), "mix_period": self.period, **streams}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = {k: int(v) for k, v in state.items()}
        for key, ours in (("seed", self.seed), ("seq_len", self.seq_len), ("mix_period", self.period)):
            if state.get(key) != ours:
                raise ValueError(f"the loader state was saved with {key}={state.get(key)}, this "
                                 f"mixture has {key}={ours}")
        self._check_mid_step_layout(state)
        for i, src in enumerate(self.sources):
            if src.sequential:
                prefix = f"source{i}."
                src.load({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        self._next_window = state["window"]
        self._restart_step(state["micro_index"])

    def source_tokens(self, state: dict[str, Any]) -> dict[str, int]:
        """Training tokens taken from each source up to `state` (whole steps)."""
        k = int(state["window"])
        return {f"tokens_seen/{name}": self.count(i, k) * self.seq_len for i, name in enumerate(self.names)}


def build_mixture(data_cfg, tokenizer, seq_len: int, global_batch_size: int, micro_batch_size: int,
                  dp_rank: int = 0, dp_world: int = 1, seed: int = 0):
    """`build_data` for a non-empty `data.mix`: the train loader and a validation factory that
    mixes the sources' val splits with the same weights, in order."""
    from titan.config.schema import DataConfig, DataSource
    from titan.data.sources import load_documents
    from titan.data.store import TokenStore

    names, weights, specs = [], [], []
    for i, entry in enumerate(data_cfg.mix):
        name = entry.name or f"source{i}"
        if name in names:
            raise ConfigError("data.mix", f"two sources are named {name!r}; give each a unique name")
        if not entry.weight > 0:
            raise ConfigError("data.mix", f"source {name!r} has weight {entry.weight}; weights must be > 0")
        names.append(name)
        weights.append(float(entry.weight))
        specs.append(entry)

    def sources(split: str, shuffle: bool) -> Optional[list]:
        built = []
        for name, entry in zip(names, specs):
            if DataSource(entry.source) == DataSource.tokens:
                store = TokenStore.open(entry.path)
                store.check_tokenizer(tokenizer)
                tokens = store.split(split)
                if tokens is None:
                    return None
                built.append((name, StoreWindows(tokens, seq_len, seed, shuffle)))
            else:
                cfg = DataConfig(source=entry.source, path=entry.path, hf_config=entry.hf_config,
                                 hf_split=entry.hf_split, text_field=entry.text_field,
                                 val_fraction=entry.val_fraction, max_documents=entry.max_documents)
                if split == "val" and cfg.val_fraction <= 0:
                    return None
                built.append((name, StreamWindows(load_documents(cfg, split), tokenizer, seq_len, seed, shuffle)))
        return built

    common = dict(seq_len=seq_len, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                  dp_rank=dp_rank, dp_world=dp_world, seed=seed)
    train = MixtureLoader(sources("train", data_cfg.shuffle), weights, **common)
    if sources("val", False) is None:
        return train, None
    return train, lambda: MixtureLoader(sources("val", False), weights, **common)
