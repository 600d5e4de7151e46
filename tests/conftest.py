import os
import tempfile

import pytest

# One cache (trained default tokenizer, measured CPU peak) per test session, shared by the
# subprocesses the tests start; a fresh machine trains the tokenizer once, here.
_CACHE = os.environ.setdefault("TITAN_CACHE_DIR", tempfile.mkdtemp(prefix="titan-test-cache-"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def cache_dir() -> str:
    return _CACHE
