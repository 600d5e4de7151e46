"""Downstream evaluation with lm-evaluation-harness: a titan model as an lm-eval `LM`
(`titan.eval.lm.TitanLM`), task running (`titan.eval.harness`), the in-loop hook
(`titan.eval.loop`), and titan's local tasks (`titan/eval/tasks/`, no download)."""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
