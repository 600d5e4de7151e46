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


_CPU_LOG = os.environ.get("TITAN_TEST_CPU_LOG")  # opt-in: per-test CPU seconds, to budget the suite


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not _CPU_LOG:
        yield
        return
    import resource
    import time

    def cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    c0, t0 = cpu(), time.time()
    yield
    with open(_CPU_LOG, "a") as f:
        f.write(f"{cpu() - c0:.1f} {time.time() - t0:.1f} {item.nodeid}\n")
