"""Chat prompts: a Jinja template from the model folder when present, else the RWKV world format.

The RWKV world format (what RWKV and GoldFinch chat models are trained on):

    System: {system}\\n\\nUser: {user}\\n\\nAssistant: {assistant}\\n\\nUser: ...\\n\\nAssistant:

Generation stops at the next turn marker ("\\n\\nUser:"), which the template adds as a stop string.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TEMPLATE_FILES = ("chat_template.jinja", "chat_template.jinja2")
ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


def message_text(content) -> str:
    """A message's content as text: a string, or the concatenated text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text if hasattr(part, "text") else str(part.get("text", "")) for part in content)


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    source: str | None = None  # Jinja source; None = the built-in RWKV world format
    stop: tuple[str, ...] = ("\n\nUser:",)

    @classmethod
    def for_model(cls, model_dir: Path | None) -> "ChatTemplate":
        if model_dir is not None and model_dir.is_dir():
            for name in TEMPLATE_FILES:
                path = model_dir / name
                if path.is_file():
                    return cls(name=str(path), source=path.read_text(encoding="utf-8"), stop=())
        return cls(name="rwkv-world")

    def render(self, messages: list, add_generation_prompt: bool = True) -> str:
        msgs = [{"role": m.role, "content": message_text(m.content)} for m in messages]
        if self.source is not None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            return env.from_string(self.source).render(messages=msgs, add_generation_prompt=add_generation_prompt)
        turns = []
        for m in msgs:
            # a blank line ends a turn in this format: collapse the user's blank lines to one newline
            text = "\n".join(line for line in m["content"].strip().split("\n") if line.strip())
            turns.append(f"{ROLE_NAMES[m['role']]}: {text}")
        prompt = "\n\n".join(turns)
        if add_generation_prompt:
            prompt += "\n\nAssistant:"
        return prompt
