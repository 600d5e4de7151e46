"""data.mix: weighted sources, exact proportions, layout-free stream, exact resume, metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from titan.config.errors import ConfigError
from titan.config.schema import DataConfig, DataSource, MixSource
from titan.data.loader import build_data
from titan.data.mixture import schedule
from titan.data.store import TokenStore
from titan.data.tokenizer import build_tokenizer
from titan.tools.plan import compose
from titan.tools.prepare_data import prepare


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mixstore") / "s"
    prepare(compose(["data.max_documents=20"]), {"out": str(out), "workers": 1, "shard_docs": 8})
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(compose([]).tokenizer)


def mix_cfg(store, shuffle=True, weights=(0.7, 0.3)) -> DataConfig:
    return DataConfig(shuffle=shuffle, prefetch=0, mix=[
        MixSource(name="web", weight=weights[0], source=DataSource.tokens, path=str(store)),
        MixSource(name="code", weight=weights[1], source=DataSource.embedded, max_documents=30),
    ])


def global_batches(cfg, tokenizer, world: int, steps: int, state=None) -> torch.Tensor:
    loaders = []
    for rank in range(world):
        loader, _ = build_data(cfg, tokenizer, 16, 20, 20 // world, rank, world, 3)
        if state is not None:
            loader.load_state_dict(state)
        loaders.append(loader)
    return torch.cat([loaders[r].next_batch()[0] for _ in range(steps) for r in range(world)])


@pytest.mark.parametrize("weights", [[0.7, 0.3], [1, 1, 2], [0.123, 0.877]])
def test_schedule_is_exact_per_period_and_close_on_every_prefix(weights):
    assign, prefix = schedule(weights)
    shares = np.asarray(weights) / sum(weights)
    period = len(assign)
    assert np.allclose(prefix[-1] / period, shares, atol=1e-3)
    for k in range(1, period + 1):
        assert np.all(np.abs(prefix[k] - k * prefix[-1] / period) < 1.0 + 1e-9)


def test_mixture_proportions_and_source_order(store, tokenizer):
    loader, _ = build_data(mix_cfg(store, shuffle=False), tokenizer, 16, 20, 20, 0, 1, 3)
    rows = loader.next_batch()[0]
    assert loader.source_tokens(loader.state_dict()) == {"tokens_seen/web": 14 * 16, "tokens_seen/code": 6 * 16}
    # the web windows are the store's windows in order
    split = TokenStore.open(str(store)).split("train")
    web = [int(k) for k in range(20) if loader.assign[k % loader.period] == 0]
    for j, k in enumerate(web):
        assert torch.equal(rows[k], torch.from_numpy(split.read(j * 17, 16)))


def test_mixture_stream_independent_of_layout_and_resumes_on_another_dp(store, tokenizer):
    cfg = mix_cfg(store)
    reference = global_batches(cfg, tokenizer, 1, 5)
    assert torch.equal(reference, global_batches(cfg, tokenizer, 2, 5))
    saved, _ = build_data(cfg, tokenizer, 16, 20, 10, 1, 2, 3)
    for _ in range(2):
        saved.next_batch()
    state = saved.state_dict()
    assert torch.equal(global_batches(cfg, tokenizer, 4, 3, state), reference[40:])


def test_mix_from_the_command_line(store):
    cfg = compose([f"data.mix=[{{name:web,weight:3,source:tokens,path:{store}}},"
                   "{name:code,weight:1,source:embedded,max_documents:10}]"])
    assert [m.name for m in cfg.data.mix] == ["web", "code"] and cfg.data.mix[0].weight == 3


def test_bad_mix_is_a_config_error(store, tokenizer):
    with pytest.raises(ConfigError, match="weights must be > 0") as e:
        build_data(mix_cfg(store, weights=(1, 0)), tokenizer, 16, 20, 20)
    assert e.value.key == "data.mix"


@pytest.mark.slow
def test_per_source_tokens_in_the_metrics(store, tmp_path):
    from tests.helpers import run_titan

    run = run_titan(tmp_path / "r", "training.steps=3", "data.val_fraction=0.1",
                    f"data.mix=[{{name:web,weight:3,source:tokens,path:{store}}},"
                    "{name:code,weight:1,source:embedded,max_documents:10}]").check()
    last = run.train[-1]
    assert last["tokens_seen/web"] == 3 * 3 * 32 and last["tokens_seen/code"] == 3 * 1 * 32
