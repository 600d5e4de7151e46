"""The first runs a user tries: a few steps, a single text file."""

from __future__ import annotations

from tests.helpers import run_titan


def test_few_steps_clamp_the_default_warmup(tmp_path):
    run = run_titan(tmp_path / "r", "training.steps=5", "lr_schedule.warmup_steps=20").check()
    assert [r["step"] for r in run.train] == [1, 2, 3, 4, 5]
    warning = [line for line in (run.stdout + run.stderr).splitlines() if "warmup_steps=20" in line]
    assert len(warning) == 1 and "training.steps=5" in warning[0], run.stdout + run.stderr


def test_train_on_one_text_file_with_and_without_validation(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("".join(f"Sentence number {i} of a small book about training.\n" for i in range(400)))
    common = ["data=files", f"data.path={book}", "training.steps=4"]
    held = run_titan(tmp_path / "held", *common, "training.val_interval=2").check()
    assert [r["step"] for r in held.val] == [2, 4] and all(r["val_loss"] > 0 for r in held.val)
    none = run_titan(tmp_path / "none", *common, "data.val_fraction=0", "training.val_interval=2").check()
    assert [r["step"] for r in none.train] == [1, 2, 3, 4] and none.val == []
