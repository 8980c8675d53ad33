"""Render the prompt templates into chat messages.

Templates are files (bundled in `prompts/` or a user's directory); the caption only ever
reaches them as data, rendered in a sandbox with StrictUndefined so a typo in a template
fails loudly instead of sending an empty prompt. The fixed instructions and examples form
the system message and the caption comes last, so an engine's prefix cache serves all but
the final few tokens of every prompt.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from jinja2 import FileSystemLoader, StrictUndefined
from jinja2.sandbox import SandboxedEnvironment

from prompts import TEMPLATE_DIR
from schemas import Caption

SYSTEM, USER, REPAIR = "queries.system.j2", "queries.user.j2", "repair.j2"

Messages = list[dict[str, str]]


class PromptSet:
    def __init__(self, directory: Path | None = None):
        self.directory = Path(directory or TEMPLATE_DIR)
        self.env = SandboxedEnvironment(
            loader=FileSystemLoader(str(self.directory)),
            undefined=StrictUndefined,
            autoescape=False,
            keep_trailing_newline=False,
        )
        self._system = self.env.get_template(SYSTEM)
        self._user = self.env.get_template(USER)
        self._repair = self.env.get_template(REPAIR)
        # Rendered once: the system message has no per-caption data, which is the point.
        self.system_text = self._system.render().strip()

    @property
    def digest(self) -> str:
        """sha256 over the three templates' sources: part of the generation fingerprint."""
        h = hashlib.sha256()
        for name in (SYSTEM, USER, REPAIR):
            h.update(name.encode() + b"\0" + (self.directory / name).read_bytes() + b"\0")
        return h.hexdigest()

    def messages(self, caption: Caption) -> Messages:
        user = self._user.render(caption={"id": caption.id, "text": caption.text}).strip()
        return [{"role": "system", "content": self.system_text}, {"role": "user", "content": user}]

    def repair(self, messages: Messages, answer: str, error: str) -> Messages:
        """The first exchange plus the validation error, so the model fixes its own answer."""
        return [
            *messages,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": self._repair.render(error=error).strip()},
        ]
