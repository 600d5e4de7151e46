"""Training from a token store: each rank reads only its own windows.

The global stream is a sequence of windows of `seq_len + 1` tokens, numbered k = 0, 1, 2, ...
and defined without reference to the layout:
- `shuffle=False`: window k is tokens [k*W, (k+1)*W) of the split's stream repeated forever
  (epochs follow each other without a break), which is exactly the on-the-fly loader's stream
  with `shuffle=False`: same documents, same order, same packing.
- `shuffle=True`: an epoch is the split's N = T // W whole windows (the tail is dropped);
  window k is window perm_e[k mod N] of epoch e = k // N, where perm_e is a permutation drawn
  from `(seed, e)`.
Global batch b is windows [b*G, (b+1)*G); data-parallel rank r reads windows
[b*G + r*G/dp, b*G + (r+1)*G/dp) and nothing else, so its cost does not grow with the world
size. The resumable state is the index of the next global window (plus the micro-batch within
a step): plain integers, the same on every rank, valid under any dp degree.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from titan.data.loader import GlobalBatchLoader
from titan.data.store import SplitTokens


class StoreLoader(GlobalBatchLoader):
    """Packed `(inputs, labels)` micro-batches for one data-parallel rank, from a store split."""

    def __init__(self, tokens: SplitTokens, seq_len: int, global_batch_size: int,
                 micro_batch_size: int, dp_rank: int = 0, dp_world: int = 1, seed: int = 0,
                 shuffle: bool = True):
        super().__init__(seq_len, global_batch_size, micro_batch_size, dp_rank, dp_world, seed)
        self.tokens = tokens
        self.shuffle = shuffle
        self.window = seq_len + 1
        self.windows_per_epoch = tokens.n_tokens // self.window
        if shuffle and self.windows_per_epoch == 0:
            raise ValueError(f"the {tokens.split} split holds {tokens.n_tokens} tokens, fewer than "
                             f"one window of seq_len + 1 = {self.window}")
        self._next_window = 0  # first global window of the next global batch
        self._batch_start = 0
        self._perm: tuple[int, np.ndarray] | None = None

    def _window_start(self, k: int) -> int:
        """Token position of global window k in the split's stream."""
        if not self.shuffle:
            return k * self.window
        epoch, i = divmod(k, self.windows_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = (epoch, rng.permutation(self.windows_per_epoch))
        return int(self._perm[1][i]) * self.window

    def _next_global_batch(self) -> bool:
        self._batch_start = self._next_window
        first = self._next_window + self.dp_rank * self.local_batch_size
        self._set_windows(np.stack([self.tokens.read(self._window_start(k), self.window)
                                    for k in range(first, first + self.local_batch_size)]))
        self._next_window += self.global_batch_size
        return True  # epochs repeat: the stream never ends

    def state_dict(self) -> dict[str, Any]:
        window = self._batch_start if self._mid_step() else self._next_window
        return {"window": window, **self._step_state(), "shuffle": int(self.shuffle),
                "split_tokens": self.tokens.n_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = {k: int(v) for k, v in state.items()}
        if "window" not in state:
            raise ValueError("the loader state was saved by an on-the-fly data source; "
                             "this run reads a token store (data=tokens)")
        for key, ours in (("seed", self.seed), ("seq_len", self.seq_len),
                          ("shuffle", int(self.shuffle)), ("split_tokens", self.tokens.n_tokens)):
            if state[key] != ours:
                raise ValueError(f"the loader state was saved with {key}={state[key]}, this "
                                 f"loader has {key}={ours} (another store or data settings)")
        self._check_mid_step_layout(state)
        self._next_window = state["window"]
        self._restart_step(state["micro_index"])


def build_store_data(data_cfg, tokenizer, seq_len: int, global_batch_size: int,
                     micro_batch_size: int, dp_rank: int = 0, dp_world: int = 1, seed: int = 0):
    """`build_data` for `data=tokens`: the train loader and a validation loader factory (None
    when the store has no val split). Validation reads the val split in order from its start
    every time, like the on-the-fly validation loader."""
    from titan.config.errors import ConfigError
    from titan.data.store import TokenStore

    store = TokenStore.open(data_cfg.path)
    store.check_tokenizer(tokenizer)
    train_tokens = store.split("train")
    if train_tokens is None:
        raise ConfigError("data.path", f"the token store {store.root} has no training tokens")
    common = dict(seq_len=seq_len, global_batch_size=global_batch_size,
                  micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_world=dp_world, seed=seed)
    try:
        train = StoreLoader(train_tokens, shuffle=data_cfg.shuffle, **common)
    except ValueError as e:
        raise ConfigError("data.path", f"{e}; prepare more documents or lower training.seq_len") from e
    val_tokens = store.split("val")
    if val_tokens is None:
        return train, None
    return train, lambda: StoreLoader(val_tokens, shuffle=False, **common)
