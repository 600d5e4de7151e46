"""Packing documents into fixed-length training sequences, sliced per data-parallel rank.

The global token stream is the same on every rank: documents in a per-epoch order (a
permutation drawn from `(seed, epoch)` for random-access sources; stream order for streaming
ones), each framed as `[bos] + encode(doc) + [eos]`, concatenated across documents and epochs,
and cut into consecutive, non-overlapping windows of `seq_len + 1` tokens (inputs =
window[:-1], labels = window[1:]). Each group of `global_batch_size` consecutive windows is one
global batch; data-parallel rank r keeps windows [r*G/dp, (r+1)*G/dp) and yields them as
micro-batches. Concatenating the ranks' micro-batches in rank order therefore reproduces exactly
what a single process would train on, whatever the parallel layout.

Documents are tokenized lazily as the stream reaches them. The position in the stream is three
integers (epoch, document index in that epoch's order, token offset in that document), which is
the whole resumable state: restoring re-tokenizes the one document under the cursor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Optional

import numpy as np
import torch

from titan.config.errors import ConfigError
from titan.config.schema import DataConfig, DataSource
from titan.data.sources import load_documents
from titan.data.tokenizer import Tokenizer


def check_batch_layout(seq_len: int, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                       dp_world: int) -> int:
    """This rank's share of the global batch (sequences), after checking the sizes fit."""
    if seq_len < 1:
        raise ConfigError("training.seq_len", f"must be >= 1, got {seq_len}")
    if global_batch_size < 1 or global_batch_size % dp_world:
        raise ConfigError("training.global_batch_size", f"{global_batch_size} is not a "
                          f"positive multiple of the data-parallel degree {dp_world}")
    local = global_batch_size // dp_world
    if micro_batch_size < 1 or local % micro_batch_size:
        raise ConfigError("training.micro_batch_size", f"{micro_batch_size} must divide the "
                          f"per-rank batch global_batch_size / dp = {local}")
    if not 0 <= dp_rank < dp_world:
        raise ValueError(f"dp_rank {dp_rank} is outside [0, {dp_world})")
    return local


class GlobalBatchLoader:
    """The global-batch bookkeeping every loader shares (on the fly, token store, mixture).

    A subclass defines the global stream of windows (rows of seq_len + 1 tokens) and, in
    `_next_global_batch`, puts this rank's windows of the next global batch into `_windows`
    (returning False at the end of finite data) and remembers where that batch began. This
    class hands them out as `(inputs, labels)` micro-batches, and holds what the resumable state
    needs about the step: the micro-batch index and the layout that a mid-step state depends on.
    """

    LAYOUT = ("seq_len", "global_batch_size", "dp_world", "micro_batch_size")

    def __init__(self, seq_len: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_world: int, seed: int):
        self.local_batch_size = check_batch_layout(seq_len, global_batch_size, micro_batch_size,
                                                   dp_rank, dp_world)
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_world = dp_world
        self.seed = seed
        self.micro_batches_per_step = self.local_batch_size // micro_batch_size  # grad accumulation
        self._windows: Optional[torch.Tensor] = None  # this rank's windows of the current batch
        self._micro = 0  # the next micro-batch in it

    def _next_global_batch(self) -> bool:
        raise NotImplementedError

    def _set_windows(self, rows: np.ndarray) -> None:
        self._windows = torch.from_numpy(np.ascontiguousarray(rows))
        self._micro = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch: int64 inputs and labels, each (micro_batch_size, seq_len)."""
        if self._windows is None or self._micro == self.micro_batches_per_step:
            if not self._next_global_batch():
                self._windows = None
                raise StopIteration
        rows = self._windows[self._micro * self.micro_batch_size:(self._micro + 1) * self.micro_batch_size]
        self._micro += 1
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            try:
                batch = self.next_batch()
            except StopIteration:
                return
            yield batch

    def _mid_step(self) -> bool:
        """Whether some, not all, micro-batches of the current global batch were taken: the
        resumable position is then where that batch began, plus the micro-batch index."""
        return self._windows is not None and self._micro < self.micro_batches_per_step

    def _step_state(self) -> dict[str, int]:
        """The state entries common to every loader: micro-batch index, seed and layout."""
        return {"micro_index": self._micro if self._mid_step() else 0, "seed": self.seed,
                **{key: getattr(self, key) for key in self.LAYOUT}}

    def _check_mid_step_layout(self, state: dict[str, int]) -> None:
        """Between steps a state resumes on any layout; within a step only on the same one."""
        if state["micro_index"] and any(state[k] != getattr(self, k) for k in self.LAYOUT):
            raise ValueError("the loader state is mid-step (micro_index > 0); resume it with the "
                             f"same {', '.join(self.LAYOUT)}")

    def _restart_step(self, micro: int) -> None:
        """After the position was restored: re-read the interrupted step's global batch and skip
        the `micro` micro-batches already taken."""
        self._windows, self._micro = None, 0
        if micro:
            if not self._next_global_batch():
                raise ValueError("the loader state points past the end of the data")
            self._micro = micro


class TokenLoader(GlobalBatchLoader):
    """Packed `(inputs, labels)` micro-batches for one data-parallel rank.

    `documents` is a Sequence[str] (random access: shuffled per epoch when `shuffle`) or a
    re-iterable of str (every `iter()` restarts it; read in its own order). With `infinite`,
    epochs repeat forever; otherwise `next_batch` raises StopIteration once the data cannot fill
    another global batch (the partial one is dropped, on every rank alike).
    """

    def __init__(
        self,
        documents: Sequence[str] | Iterable[str],
        tokenizer: Tokenizer,
        seq_len: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_world: int = 1,
        seed: int = 0,
        infinite: bool = True,
        shuffle: bool = True,
    ):
        super().__init__(seq_len, global_batch_size, micro_batch_size, dp_rank, dp_world, seed)
        self._indexed = isinstance(documents, Sequence) and not isinstance(documents, str)
        if not self._indexed and iter(documents) is documents:
            raise TypeError("documents must be a Sequence or re-iterable (not a one-shot iterator)")
        if self._indexed and len(documents) == 0:
            raise ValueError("no documents to load")
        self.documents = documents
        self.tokenizer = tokenizer
        self.infinite = infinite
        self.shuffle = shuffle

        # Stream cursor: the next unread token is `_offset` into document `_doc` of `_epoch`.
        self._epoch = self._doc = self._offset = 0
        self._tokens: Optional[np.ndarray] = None  # tokens of document `_doc`, once read
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation) cache
        self._stream: tuple[int, int, Iterator[str]] | None = None  # (epoch, next index, iter)
        self._resumable = getattr(documents, "open_resumable", None) is not None
        self._doc_stream_state: tuple[int, int, str] | None = None  # stream state before a doc
        # Where the current global batch began: the resumable position while it is consumed.
        self._batch_start = (0, 0, 0)
        self._batch_stream_state = ""

    # ----------------------------------------------------------------------------------------
    # documents and tokens
    # ----------------------------------------------------------------------------------------
    def _document(self, epoch: int, index: int) -> Optional[str]:
        """Text of the `index`-th document of `epoch`'s order; None past the end of the epoch."""
        if self._indexed:
            n = len(self.documents)
            if index >= n:
                return None
            if not self.shuffle:
                return self.documents[index]
            if self._order is None or self._order[0] != epoch:
                rng = np.random.default_rng([self.seed, epoch])
                self._order = (epoch, rng.permutation(n))
            return self.documents[int(self._order[1][index])]
        # Streaming: reopen when going back (resume) or into another epoch; skip without tokenizing.
        if self._stream is None or self._stream[0] != epoch or self._stream[1] > index:
            self._stream = (epoch, 0, self._open_stream())
        _, pos, it = self._stream
        text = None
        while pos <= index:
            if pos == index and self._resumable:
                self._doc_stream_state = (epoch, index, it.state())
            text = next(it, None)
            if text is None:
                break
            pos += 1
        self._stream = (epoch, pos, it)
        return text

    def _open_stream(self, state: Optional[str] = None) -> Iterator[str]:
        if self._resumable:
            from titan.data.sources import StreamCursor

            return StreamCursor(self.documents, state)
        return iter(self.documents)

    def _stream_state(self) -> str:
        """The resumable stream's state just before the document under the cursor ("" if unknown:
        a resume then re-reads the stream up to the cursor)."""
        if not self._resumable or self._stream is None:
            return ""
        epoch, pos, it = self._stream
        if (epoch, pos) == (self._epoch, self._doc):
            return it.state()
        if self._doc_stream_state is not None and self._doc_stream_state[:2] == (self._epoch, self._doc):
            return self._doc_stream_state[2]
        return ""

    def _current_tokens(self) -> Optional[np.ndarray]:
        """Tokens of the document under the cursor, moving to the next epoch at an epoch's end."""
        if self._tokens is not None:
            return self._tokens
        text = self._document(self._epoch, self._doc)
        if text is None:
            if self._doc == 0:
                raise ValueError("the document source yielded no documents")
            if not self.infinite:
                return None
            self._epoch, self._doc, self._offset = self._epoch + 1, 0, 0
            return self._current_tokens()
        ids = [self.tokenizer.bos_id, *self.tokenizer.encode(text), self.tokenizer.eos_id]
        self._tokens = np.asarray(ids, dtype=np.int64)
        return self._tokens

    def _take(self, n: int) -> Optional[np.ndarray]:
        """The next `n` tokens of the stream, or None when a finite stream runs out."""
        parts, need = [], n
        while need:
            tokens = self._current_tokens()
            if tokens is None:
                return None
            k = min(need, len(tokens) - self._offset)
            parts.append(tokens[self._offset:self._offset + k])
            self._offset += k
            need -= k
            if self._offset == len(tokens):
                self._doc, self._offset, self._tokens = self._doc + 1, 0, None
        return np.concatenate(parts)

    def _next_global_batch(self) -> bool:
        self._batch_start = (self._epoch, self._doc, self._offset)
        self._batch_stream_state = self._stream_state()
        window = self.seq_len + 1
        # Every rank reads (and tokenizes) the whole global batch: the packing of its windows
        # depends on all documents before them.
        tokens = self._take(self.global_batch_size * window)
        if tokens is None:
            return False
        lo = self.dp_rank * self.local_batch_size
        self._set_windows(tokens.reshape(self.global_batch_size, window)[lo:lo + self.local_batch_size])
        return True

    # ----------------------------------------------------------------------------------------
    # resumable state
    # ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain ints: the stream position and the micro-batch within the current global batch.

        Between optimizer steps (`micro_index` 0) the state is the same on every rank and does
        not depend on the parallel layout, so a run may resume on another dp degree.
        """
        if self._mid_step():
            (epoch, doc, offset), stream = self._batch_start, self._batch_stream_state
        else:
            epoch, doc, offset, stream = self._epoch, self._doc, self._offset, self._stream_state()
        state = {"epoch": epoch, "document": doc, "token_offset": offset, **self._step_state()}
        if self._resumable:  # a JSON string: the dataset's own position (hf streaming)
            state["stream_state"] = stream
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        stream = state.get("stream_state") or ""
        state = {k: int(v) for k, v in state.items() if k != "stream_state"}  # 0-d tensors too
        if state["seed"] != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, "
                             f"this loader uses {self.seed}")
        self._check_mid_step_layout(state)
        self._epoch, self._doc = state["epoch"], state["document"]
        self._offset = state["token_offset"]
        self._tokens, self._stream, self._windows = None, None, None
        if stream and self._resumable:  # restart the dataset where it was, no re-reading
            self._stream = (self._epoch, self._doc, self._open_stream(stream))
        if self._offset:  # re-tokenize the document under the cursor; check the offset fits
            tokens = self._current_tokens()
            if tokens is None or self._offset >= len(tokens):
                raise ValueError("the loader state does not match these documents/tokenizer")
        self._restart_step(state["micro_index"])


def build_data(
    data_cfg: DataConfig,
    tokenizer: Tokenizer,
    seq_len: int,
    global_batch_size: int,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_world: int = 1,
    seed: int = 0,
) -> tuple[TokenLoader, Optional[Callable[[], TokenLoader]]]:
    """The train loader and a factory of validation loaders (None when val_fraction is 0).

    `data.shuffle` shuffles the training documents per epoch (false: source order).
    `data.prefetch` > 0 produces that many global batches ahead in a background thread.

    Every call of the factory returns a fresh loader at the start of the val split, in fixed
    document order (no shuffle) and sliced across dp ranks like training, which wraps around if
    an evaluation asks for more batches than the split holds: each evaluation sees the same
    batches.
    """
    if data_cfg.prefetch < 0:
        raise ConfigError("data.prefetch", f"must be >= 0 (0: no background worker), got {data_cfg.prefetch}")
    if data_cfg.mix:
        from titan.data.mixture import build_mixture

        train, make_val = build_mixture(data_cfg, tokenizer, seq_len, global_batch_size,
                                        micro_batch_size, dp_rank, dp_world, seed)
        return _prefetched(train, data_cfg.prefetch), make_val
    if DataSource(data_cfg.source) == DataSource.tokens:
        from titan.data.store_loader import build_store_data

        train, make_val = build_store_data(data_cfg, tokenizer, seq_len, global_batch_size,
                                           micro_batch_size, dp_rank, dp_world, seed)
        return _prefetched(train, data_cfg.prefetch), make_val
    common = dict(tokenizer=tokenizer, seq_len=seq_len, global_batch_size=global_batch_size,
                  micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_world=dp_world, seed=seed)
    train = TokenLoader(load_documents(data_cfg, "train"), shuffle=data_cfg.shuffle, infinite=True,
                        **common)
    train = _prefetched(train, data_cfg.prefetch)
    if data_cfg.val_fraction <= 0:
        return train, None
    val_docs = load_documents(data_cfg, "val")
    replay = ValReplay(lambda: TokenLoader(val_docs, shuffle=False, infinite=True, **common))
    return train, replay.loader


def _prefetched(loader, global_batches: int):
    if global_batches == 0:
        return loader
    from titan.data.prefetch import Prefetcher

    return Prefetcher(loader, depth=global_batches * loader.micro_batches_per_step)


class ValReplay:
    """Validation batches made once: every evaluation starts from the same first batch, so the
    micro-batches produced for one evaluation are kept and replayed by the next (a longer one
    continues the same loader). A streamed source is then opened once, not per evaluation."""

    def __init__(self, make_loader: Callable[[], Any]):
        self._make = make_loader
        self._source = None
        self._batches: list = []

    def _batch(self, i: int):
        while len(self._batches) <= i:
            if self._source is None:
                self._source = self._make()
            self._batches.append(self._source.next_batch())
        return self._batches[i]

    def loader(self) -> "_Replayed":
        return _Replayed(self)


class _Replayed:
    def __init__(self, replay: ValReplay):
        self._replay, self._i = replay, 0

    def __getattr__(self, name: str) -> Any:  # micro_batches_per_step, seq_len, ... of the loader
        if name.startswith("_"):
            raise AttributeError(name)
        replay = self._replay
        if replay._source is None:
            replay._source = replay._make()
        return getattr(replay._source, name)

    def next_batch(self):
        batch = self._replay._batch(self._i)
        self._i += 1
        return batch
