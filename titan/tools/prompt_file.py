"""Read the prompts of `titan.tools.generate prompts=FILE`.

A `.jsonl` file holds one JSON object per line: `{"prompt": "..."}`, or with `chat=true`
`{"messages": [{"role": ..., "content": ...}, ...]}` (a conversation to continue) or a
`prompt` (one user message). Any other file holds one prompt per line (blank lines skipped).
Every problem is one line naming the file, the line and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

Prompt = Union[str, list]  # text, or a list of {role, content} messages


class PromptFileError(ValueError):
    pass


def read_prompts(path: str, chat: bool) -> list[Prompt]:
    file = Path(path)
    if not file.is_file():
        raise PromptFileError(f"prompts={path}: no such file")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise PromptFileError(f"prompts={path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not numbered:
        raise PromptFileError(f"prompts={path}: the file holds no prompt; write one per line (or JSONL records with a 'prompt' or 'messages' field)")
    if file.suffix != ".jsonl":
        return [line for _, line in numbered]
    return [_record(path, n, line, chat) for n, line in numbered]


def _record(path: str, n: int, line: str, chat: bool) -> Prompt:
    where = f"prompts={path} line {n}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise PromptFileError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise PromptFileError(f"{where}: expected a JSON object with a 'prompt' or 'messages' field, got {type(record).__name__}")
    if "messages" in record:
        if not chat:
            raise PromptFileError(f"{where}: 'messages' conversations need chat=true")
        messages = record["messages"]
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)):
            raise PromptFileError(f"{where}: 'messages' must be a non-empty list of {{\"role\": ..., \"content\": ...}} strings")
        return messages
    if isinstance(record.get("prompt"), str):
        return record["prompt"]
    raise PromptFileError(f"{where}: expected a 'prompt' string{' or a messages list' if chat else ''}; found fields {sorted(record)}")
