"""Datasets of titan's local lm-eval tasks, built from text that ships with Python itself
(the pydoc topics and the builtins' names), written once as JSONL into titan's cache and
loaded with `datasets`' json builder: no network, the same examples on every machine with
the same Python. The task YAMLs beside this file name these functions (`custom_dataset`)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

N_EXAMPLES = 200
SEED = 0


def _sentences() -> list[str]:
    from pydoc_data.topics import topics

    found = []
    for key in sorted(topics):
        for raw in re.split(r"(?<=[.!?])\s+", " ".join(topics[key].split())):
            words = raw.split()
            if 8 <= len(words) <= 24 and raw[0].isupper() and raw.endswith(".") and raw.isascii():
                found.append(raw)
    return sorted(set(found))


def choice_examples(n: int = N_EXAMPLES) -> list[dict]:
    """Cloze multiple choice: the first words of a sentence from the Python docs, and four
    endings, one its own and three from other sentences."""
    rng = random.Random(SEED)
    sentences = _sentences()
    picked = rng.sample(sentences, n)
    examples = []
    for sentence in picked:
        words = sentence.split()
        cut = len(words) // 2
        others = rng.sample([s for s in sentences if s != sentence], 3)
        endings = [" ".join(o.split()[len(o.split()) // 2:]) for o in others]
        gold = rng.randrange(4)
        endings.insert(gold, " ".join(words[cut:]))
        examples.append({"context": " ".join(words[:cut]), "endings": endings, "label": gold})
    return examples


def copy_examples(n: int = N_EXAMPLES) -> list[dict]:
    """Copying: three names from Python's builtins, then the same three again."""
    import builtins

    rng = random.Random(SEED + 1)
    names = sorted(n for n in dir(builtins) if n.isidentifier() and not n.startswith("_"))
    return [{"text": " ".join(rng.sample(names, 3))} for _ in range(n)]


def _jsonl(name: str, examples: list[dict]) -> Path:
    from titan.config.load import cache_dir

    path = cache_dir("eval_tasks") / f"{name}-v1.jsonl"
    if not path.exists():
        tmp = path.with_suffix(f".tmp{random.getrandbits(32)}")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in examples))
        tmp.replace(path)  # atomic: parallel ranks never read a half-written file
    return path


def _load(path: Path):
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(path)})


def titan_choice(**kwargs):
    return _load(_jsonl("titan_choice", choice_examples()))


def titan_copy(**kwargs):
    return _load(_jsonl("titan_copy", copy_examples()))
