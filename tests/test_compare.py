"""titan.tools.compare on synthetic run dirs laid out as the trainer writes them."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from titan.config.load import plain
from titan.config.schema import TrainConfig
from titan.tools.compare import (
    check_agreement,
    differing_keys,
    find_runs,
    format_table,
    load_run,
    main,
)
from titan.tools.runs import NoRunsError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOKENS_PER_STEP = 2048


def losses(steps: int, scale: float = 1.0) -> list[float]:
    return [scale * (8.0 - 4.0 * (1 - math.exp(-s / 10))) for s in range(1, steps + 1)]


def train_record(step: int, loss: float) -> dict:
    return {
        "step": step, "loss": loss, "grad_norm": 1.5 / step, "lr": 3e-4, "tokens_per_sec": 2500.0,
        "tokens_per_sec_per_device": 2500.0, "tflops": 0.1, "mfu": 0.4, "memory_gib": 1.1,
        "data_time_frac": 0.01, "tokens_seen": step * TOKENS_PER_STEP, "elapsed_s": 0.8 * step,
    }


def val_record(step: int, val_loss: float) -> dict:
    return {"step": step, "val_loss": val_loss, "val_ppl": math.exp(val_loss),
            "tokens_seen": step * TOKENS_PER_STEP}


def make_run(
    path: Path,
    train_losses: list[float],
    val_every: int = 5,
    val_scale: float = 1.0,
    set_keys: dict | None = None,
    choices: dict | None = None,
    overrides: list[str] | None = None,
    summary: dict | None = None,
    first_tokens_per_sec: float | None = None,
) -> Path:
    """A run dir: metrics.jsonl (+ val records), .hydra/{config,overrides,hydra}.yaml."""
    path.mkdir(parents=True)
    records = []
    for step, loss in enumerate(train_losses, start=1):
        records.append(train_record(step, loss))
        if val_every and step % val_every == 0:
            records.append(val_record(step, val_scale * (loss + 0.1)))
    if first_tokens_per_sec is not None:
        records[0]["tokens_per_sec"] = first_tokens_per_sec
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = plain(TrainConfig())
    config["run_dir"] = str(path)
    for key, value in (set_keys or {}).items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    hydra = path / ".hydra"
    hydra.mkdir()
    (hydra / "config.yaml").write_text(yaml.safe_dump(config))
    (hydra / "overrides.yaml").write_text(yaml.safe_dump(overrides or []))
    all_choices = {"model": "llama3_debug", "parallel": "single", "hydra/launcher": "basic",
                   **(choices or {})}
    (hydra / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"choices": all_choices}}})
    )
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    return path


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Three agreeing jobs (different layouts, identical losses up to 1e-7)."""
    root = tmp_path / "multirun" / "2026-11-24" / "10-00-00_layouts"
    for job, (layout, nproc) in enumerate([("single", 1), ("ddp", 2), ("fsdp", 2)]):
        make_run(
            root / str(job),
            losses(20, 1 + 1e-7 * job),
            set_keys={"parallel.name": layout, "parallel.nproc_per_node": nproc},
            choices={"parallel": layout},
            overrides=[f"parallel={layout}", "+sweeps=layouts"],
        )
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_load_run_keeps_the_later_record_of_a_resumed_step(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", losses(6), val_every=3)
    # Resumed from step 4: steps 5, 6 and the validation at 6 are logged again, then 7, 8.
    with open(run_dir / "metrics.jsonl", "a") as f:
        for step in (5, 6, 7, 8):
            f.write(json.dumps(train_record(step, 100.0 + step)) + "\n")
        f.write(json.dumps(val_record(6, 42.0)) + "\n")
        f.write('{"step": 9, "loss": 1.')  # a crash mid-write
    run = load_run(run_dir)
    assert [r["step"] for r in run.train] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert run.series("loss")[5] == 105.0 and run.series("loss")[4] == losses(6)[3]
    assert run.series("val_loss") == {3: losses(6)[2] + 0.1, 6: 42.0}
    assert run.skipped_lines == 1
    assert run.final_loss == 108.0 and run.steps == 8
    assert run.choices["parallel"] == "single"
    assert run.config["training"]["seed"] == 42


def test_summary_wins_over_records_and_first_record_is_left_out_of_means(tmp_path: Path) -> None:
    run = load_run(make_run(
        tmp_path / "run", losses(10), first_tokens_per_sec=10.0,
        summary={"final_loss": 3.5, "final_val_loss": 3.6, "min_loss": 3.4, "steps": 10,
                 "tokens_seen": 10 * TOKENS_PER_STEP},
    ))
    assert (run.final_loss, run.min_loss, run.final_val_loss) == (3.5, 3.4, 3.6)
    assert run.mean("tokens_per_sec") == 2500.0  # the slow warm-up record is skipped


def test_find_runs_orders_jobs_numerically_and_names_them_apart(tmp_path: Path) -> None:
    for job in (0, 2, 10, 1):
        make_run(tmp_path / "a" / "sweep" / str(job), losses(3))
    make_run(tmp_path / "b" / "sweep" / "0", losses(3))
    runs = find_runs([tmp_path / "a", tmp_path / "b", tmp_path / "a" / "sweep" / "2"])
    assert [r.name for r in runs] == ["a/sweep/0", "a/sweep/1", "a/sweep/2", "a/sweep/10",
                                      "b/sweep/0"]
    assert [r.name for r in find_runs([tmp_path / "a"])] == ["0", "1", "2", "10"]


def test_path_without_runs_is_a_clear_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoRunsError, match="no runs found"):
        find_runs([tmp_path / "empty"])
    assert main([str(tmp_path / "empty")]) == 2
    assert "empty: no runs found" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_differing_keys_reports_settings_and_groups_not_noise(tmp_path: Path) -> None:
    common = {"logging.group": "g"}
    a = make_run(tmp_path / "a", losses(3), set_keys={**common, "optim.lr": 1e-3})
    b = make_run(tmp_path / "b", losses(3),
                 set_keys={**common, "optim.lr": 3e-3, "training.seed": 7,
                           "logging.name": "other", "parallel.nproc_per_node": 2},
                 choices={"parallel": "ddp", "hydra/launcher": "submitit_local"})
    runs = find_runs([a, b])
    # run_dir and logging.name differ but are noise; parallel.* collapses into the group choice.
    assert differing_keys(runs) == ["parallel", "optim.lr", "training.seed"]
    assert differing_keys(runs[:1]) == []
    assert differing_keys(find_runs([a, a.parent / "a"])) == []


def test_differing_keys_falls_back_to_overrides(tmp_path: Path) -> None:
    dirs = [make_run(tmp_path / str(i), losses(3), overrides=[f"optim.lr={lr}", "+sweeps=x"])
            for i, lr in enumerate((1e-3, 3e-3))]
    for d in dirs:
        (d / ".hydra" / "config.yaml").unlink()
    runs = find_runs(dirs)
    assert differing_keys(runs) == ["optim.lr"]


def test_table_lists_every_run_with_its_numbers_and_differences(sweep: Path, capsys) -> None:
    assert main([str(sweep), "--no-plot"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["run", "final", "loss"]
    rows = {line.split()[0]: line for line in lines[2:5]}
    assert set(rows) == {"0", "1", "2"}
    assert f"{losses(20)[-1]:.4f}" in rows["0"]  # final loss
    assert "parallel=ddp" in rows["1"] and "parallel=fsdp" in rows["2"]
    assert "2,500" in rows["0"] and "40.00%" in rows["0"]  # mean tokens/s and MFU
    assert "20" in rows["0"].split()  # steps
    assert not (sweep / "compare.png").exists()
    assert format_table(find_runs([sweep])).count("\n") == 4  # header, rule, three runs


def test_plot_writes_a_png_into_the_first_path_by_default(sweep: Path, tmp_path: Path) -> None:
    assert main([str(sweep)]) == 0
    png = (sweep / "compare.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    no_val = make_run(tmp_path / "no_val", losses(5), val_every=0)
    out = tmp_path / "figs" / "cmp.png"
    assert main([str(no_val), str(sweep / "0"), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_agreeing_runs_pass_the_reference_check(sweep: Path, capsys) -> None:
    results = check_agreement(find_runs([sweep]), find_runs([sweep])[0], "loss", rtol=1e-5)
    assert [(a.run, a.ok, a.common_steps) for a in results] == [("1", True, 20), ("2", True, 20)]
    assert 1e-8 < results[1].max_rel_dev < 1e-6
    assert main([str(sweep), "--no-plot", "--reference", "0", "--rtol", "1e-5"]) == 0
    out = capsys.readouterr().out
    assert "agreement with 0" in out and out.count(" ok") == 4  # loss and val_loss, 2 runs


def test_diverging_val_loss_fails_the_check(sweep: Path, capsys) -> None:
    make_run(sweep / "3", losses(20), val_scale=1.01)
    assert main([str(sweep), "--no-plot", "--reference", "0", "--rtol", "1e-3"]) == 1
    out = capsys.readouterr().out
    assert "3  val_loss" in out and "DIVERGES from step 5" in out
    assert main([str(sweep), "--no-plot", "--reference", "0", "--no-val"]) == 0
    # Another metric, where run 3 agrees, passes.
    assert main([str(sweep), "--no-plot", "--reference", "0", "--key", "grad_norm"]) == 0


def test_atol_and_no_common_steps(tmp_path: Path, capsys) -> None:
    ref = make_run(tmp_path / "ref", [0.0, 1.0, 2.0], val_every=0)
    near = make_run(tmp_path / "near", [1e-4, 1.0, 2.0], val_every=0)
    assert main([str(near), "--no-plot", "--reference", str(ref), "--rtol", "0"]) == 1
    assert main([str(near), "--no-plot", "--reference", str(ref), "--rtol", "0",
                 "--atol", "1e-3"]) == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text(json.dumps(val_record(5, 1.0)) + "\n")
    capsys.readouterr()
    assert main([str(other), "--no-plot", "--reference", str(ref)]) == 1
    assert "no common steps" in capsys.readouterr().out
    assert main([str(ref), "--no-plot", "--reference", "nope"]) == 2


def test_cli_exit_status_in_a_subprocess(sweep: Path) -> None:
    make_run(sweep / "3", losses(20, 1.05))
    proc = subprocess.run(
        [sys.executable, "-m", "titan.tools.compare", str(sweep), "--no-plot",
         "--reference", str(sweep / "0"), "--rtol", "1e-3"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "3  loss" in proc.stdout and "DIVERGES from step 1" in proc.stdout
    assert "1  loss" in proc.stdout
