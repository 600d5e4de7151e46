"""Conversations -> token ids with a per-token "trained" flag (assistant tokens only).

A chat template turns a conversation into text segments, each marked trained or not: the
assistant turns' content and end-of-turn markers are trained, headers, system and user turns
are not. Two templates:
- titan's built-in Llama 3 template (`<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>`);
- a Jinja template (a tokenizer's `tokenizer_config.json` `chat_template`, or a .jinja file),
  rendered with jinja2 as transformers does (sandboxed, trim_blocks, lstrip_blocks). Assistant
  spans are found by rendering growing prefixes of the conversation: the text an assistant
  message adds after the generation prompt is that message's trained span.
The BOS token is added as an id by the packer (document masking relies on it), so templates
are rendered with an empty `bos_token`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Protocol

from titan.config.errors import ConfigError

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
Segment = tuple[str, bool]  # (text, trained)


class ChatTemplate(Protocol):
    def segments(self, messages: list[Message]) -> list[Segment]: ...

    def prompt(self, messages: list[Message]) -> str:
        """The text that asks the model for the next assistant turn (generation)."""
        ...


class Llama3Template:
    """Llama 3's chat format (without the BOS, added by the packer)."""

    name = "llama3"

    @staticmethod
    def _header(role: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    def segments(self, messages: list[Message]) -> list[Segment]:
        out: list[Segment] = []
        for m in messages:
            out.append((self._header(m["role"]), False))
            out.append((m["content"] + "<|eot_id|>", m["role"] == "assistant"))
        return out

    def prompt(self, messages: list[Message]) -> str:
        return "".join(text for text, _ in self.segments(messages)) + self._header("assistant")


class JinjaTemplate:
    """A Hugging Face chat template (Jinja), rendered like transformers' apply_chat_template."""

    def __init__(self, source: str, name: str, eos_token: str = "", bos_token: str = ""):
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = raise_exception
        self._template = env.from_string(source)
        self.name = name
        self.eos_token = eos_token
        self.bos_token = bos_token  # not rendered: the packer adds the BOS id

    def render(self, messages: list[Message], add_generation_prompt: bool) -> str:
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token="", eos_token=self.eos_token
        )

    def segments(self, messages: list[Message]) -> list[Segment]:
        out: list[Segment] = []
        done = ""
        for i, m in enumerate(messages):
            assistant = m["role"] == "assistant"
            if assistant:  # the generation prompt (assistant header) is not trained
                before = self.render(messages[:i], add_generation_prompt=True) if i else self.render([], True)
                if not before.startswith(done):
                    raise ValueError(f"chat template {self.name}: rendering is not prefix-stable at message {i}")
                out.append((before[len(done):], False))
                done = before
            text = self.render(messages[: i + 1], add_generation_prompt=False)
            if not text.startswith(done):
                raise ValueError(
                    f"chat template {self.name}: the rendering of the first {i + 1} messages does not extend "
                    "that of the first {i}; cannot locate the assistant tokens (use data.chat_template=llama3)"
                )
            out.append((text[len(done):], assistant))
            done = text
        return [(t, trained) for t, trained in out if t]

    def prompt(self, messages: list[Message]) -> str:
        return self.render(messages, add_generation_prompt=True)


def tokenizer_chat_template(tokenizer_path: Optional[str]) -> Optional[JinjaTemplate]:
    """The chat template of the tokenizer_config.json next to a tokenizer file (or in a
    tokenizer directory), if any."""
    if not tokenizer_path:
        return None
    path = Path(tokenizer_path)
    config = (path if path.is_dir() else path.parent) / "tokenizer_config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    source = data.get("chat_template")
    if isinstance(source, list):  # several named templates: the default one
        source = next((t["template"] for t in source if t.get("name") == "default"), None)
    if not source:
        return None
    token = lambda v: v.get("content", "") if isinstance(v, dict) else (v or "")  # noqa: E731
    return JinjaTemplate(source, str(config), eos_token=token(data.get("eos_token")), bos_token=token(data.get("bos_token")))


def build_chat_template(choice: Optional[str], tokenizer_path: Optional[str]) -> ChatTemplate:
    """data.chat_template: None -> the tokenizer's template if it has one, else the built-in
    Llama 3 template; "llama3" -> built-in; a path -> that Jinja file."""
    if choice in (None, "", "auto"):
        return tokenizer_chat_template(tokenizer_path) or Llama3Template()
    if choice == "llama3":
        return Llama3Template()
    path = Path(choice)
    if not path.is_file():
        raise ConfigError("data.chat_template", f"{choice!r} is neither 'llama3' nor a Jinja template file")
    return JinjaTemplate(path.read_text(), str(path))


def encode_text(tokenizer, text: str) -> list[int]:
    """Encode `text`, mapping the tokenizer's special-token strings (e.g. `<|eot_id|>` for a
    Llama 3 tokenizer) to their ids; tokenizers without specials encode them as text."""
    specials = getattr(tokenizer, "special_tokens", None) or {}
    if not specials:
        return tokenizer.encode(text)
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    ids: list[int] = []
    for piece in re.split(pattern, text):
        if piece in specials:
            ids.append(specials[piece])
        elif piece:
            ids.extend(tokenizer.encode(piece))
    return ids


def encode_conversation(tokenizer, template: ChatTemplate, messages: list[Message]) -> tuple[list[int], list[bool]]:
    """[bos] + the template's segments + [eos] and which of them are trained (the EOS is trained
    when the conversation ends with an assistant turn: the model learns to stop)."""
    ids, trained = [tokenizer.bos_id], [False]
    for text, is_trained in template.segments(messages):
        piece = encode_text(tokenizer, text)
        ids.extend(piece)
        trained.extend([is_trained] * len(piece))
    ids.append(tokenizer.eos_id)
    trained.append(bool(messages) and messages[-1]["role"] == "assistant")
    return ids, trained


def to_messages(row: dict, fmt: str, where: str) -> list[Message]:
    """One record -> messages, by `data.sft_format` (auto: `messages` if present, else
    `prompt`/`response`, with an optional `system`)."""
    if fmt in ("auto", "messages") and "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ConfigError("data.sft_format", f"{where}: `messages` must be a list of {{role, content}} objects")
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    if fmt in ("auto", "prompt_response") and "prompt" in row and "response" in row:
        messages = [{"role": "system", "content": str(row["system"])}] if row.get("system") else []
        return messages + [{"role": "user", "content": str(row["prompt"])}, {"role": "assistant", "content": str(row["response"])}]
    wanted = {"auto": "`messages` or `prompt` + `response`", "messages": "`messages`", "prompt_response": "`prompt` + `response`"}[fmt]
    raise ConfigError(
        "data.sft_format",
        f"{where}: data.sft_format={fmt} needs {wanted}; found fields {sorted(row)}. Rename the fields "
        "or set data.sft_format",
    )
