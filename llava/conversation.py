"""The `llada` chat template (the only one LaViDa-LLaDA uses), rendered without a tokenizer.

Upstream renders it through the LLaDA tokenizer's Jinja chat template; the string is the same:
each message is `<|start_header_id|>ROLE<|end_header_id|>\\n\\n` + stripped content + `<|eot_id|>`,
BOS only before the first message, and the prompt always ends with an open assistant header.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from llava.constants import DEFAULT_IMAGE_TOKEN, SYSTEM_PROMPT

BOS = "<|startoftext|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"


def _message(role: str, content: str) -> str:
    return f"{START_HEADER}{role}{END_HEADER}\n\n{content.strip()}{EOT}"


@dataclass
class Conversation:
    """A system prompt plus alternating user/assistant turns."""

    system: str = SYSTEM_PROMPT
    roles: tuple[str, str] = ("user", "assistant")
    messages: list[tuple[str, str | None]] = field(default_factory=list)
    stop_str: str = EOT

    def append_message(self, role: str, content: str | None) -> None:
        self.messages.append((role, content))

    def get_prompt(self) -> str:
        """Render all turns; a trailing `None` assistant turn (or none) leaves the header open."""
        parts = [BOS, _message("system", self.system)] if self.system else [BOS]
        for role, content in self.messages:
            if content is None:
                break
            parts.append(_message(role, content))
        parts.append(f"{START_HEADER}assistant{END_HEADER}\n\n")
        return "".join(parts)

    def copy(self) -> "Conversation":
        return Conversation(self.system, self.roles, list(self.messages), self.stop_str)


conv_templates = {"llada": Conversation()}
default_conversation = conv_templates["llada"]


def build_prompt(question: str, with_image: bool = True, conv_template: str = "llada") -> str:
    """The inference prompt LaViDa's eval uses: `<image>\\n` + question in one user turn."""
    conv = conv_templates[conv_template].copy()
    content = f"{DEFAULT_IMAGE_TOKEN}\n{question}" if with_image else question
    conv.append_message(conv.roles[0], content)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()
