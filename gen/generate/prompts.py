"""Render the prompt templates into chat messages.

Templates are files (bundled in `prompts/` or a user's directory); the caption only ever
reaches them as data, rendered in a sandbox with StrictUndefined so a typo in a template
fails loudly instead of sending an empty prompt. The fixed instructions and examples form
the system message and the caption comes last, so an engine's prefix cache serves all but
the final few tokens of every prompt.
"""
from __future__ import annotations

import hashlib
import os
import traceback
from pathlib import Path
from typing import Any

from jinja2 import FileSystemLoader, StrictUndefined, Template, TemplateNotFound, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment, SecurityError

from prompts import TEMPLATE_DIR
from schemas import Caption

SYSTEM, USER, REPAIR = "queries.system.j2", "queries.user.j2", "repair.j2"
# What each template is given to render; said in the error when it names something else.
GIVEN = {SYSTEM: "nothing", USER: "caption.id, caption.text", REPAIR: "error"}
PROBE = Caption(id="probe", text="探针：一只猫在沙发上睡觉")

Messages = list[dict[str, str]]


class PromptError(ValueError):
    """A template that cannot be loaded or rendered; the message names its file and line."""


class Templates:
    """One directory's templates in a sandbox; every failure a PromptError naming file and line."""

    def __init__(self, directory: Path, given: dict[str, str]):
        self.directory, self.given = Path(directory), given
        if not self.directory.is_dir():
            raise PromptError(f"prompts directory not found: {self.directory}")
        self.env = SandboxedEnvironment(
            loader=FileSystemLoader(str(self.directory)),
            undefined=StrictUndefined,
            autoescape=False,
            keep_trailing_newline=False,
        )

    def load(self, name: str) -> Template:
        try:
            return self.env.get_template(name)
        except TemplateNotFound:
            raise PromptError(f"{self.directory}: no template {name} (a prompts directory "
                              f"needs {', '.join(self.given)})") from None
        except TemplateSyntaxError as e:
            raise PromptError(f"{e.filename or self.directory / name}:{e.lineno}: "
                              f"template syntax error: {e.message}") from None
        except (UnicodeDecodeError, OSError) as e:
            raise PromptError(f"{self.directory / name}: cannot read the template ({e})") from None

    def render(self, template: Template, **data: Any) -> str:
        try:
            return template.render(**data)
        except Exception as e:  # noqa: BLE001 - whatever a template does wrong, say where
            raise PromptError(self._where(template, e) + ": " + self._what(template, e)) from None

    def _what(self, template: Template, e: Exception) -> str:
        if isinstance(e, SecurityError):
            return f"not allowed in the template sandbox: {e}"
        if isinstance(e, UndefinedError):
            return f"{e} (this template is given {self.given.get(template.name, 'nothing')})"
        return f"{type(e).__name__}: {e}"

    def _where(self, template: Template, e: Exception) -> str:
        """jinja2 puts the template's file and line into the traceback; the innermost wins
        (an included template's line, not the include's)."""
        inside = os.path.normpath(self.directory) + os.sep
        frames = [f for f in traceback.extract_tb(e.__traceback__)
                  if os.path.normpath(f.filename).startswith(inside)]
        return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else str(template.filename)


class PromptSet:
    def __init__(self, directory: Path | None = None):
        self.directory = Path(directory or TEMPLATE_DIR)
        self.templates = Templates(self.directory, GIVEN)
        self._system = self.templates.load(SYSTEM)
        self._user = self.templates.load(USER)
        self._repair = self.templates.load(REPAIR)
        # Rendered once: the system message has no per-caption data, which is the point.
        self.system_text = self.templates.render(self._system).strip()
        # A probe of the others: a template naming what it is not given fails now, before
        # the first request, not at the first caption of a run.
        self.repair(self.messages(PROBE), "{}", "probe")

    @property
    def digest(self) -> str:
        """sha256 over the three templates' sources: part of the generation fingerprint."""
        h = hashlib.sha256()
        for name in (SYSTEM, USER, REPAIR):
            h.update(name.encode() + b"\0" + (self.directory / name).read_bytes() + b"\0")
        return h.hexdigest()

    def messages(self, caption: Caption) -> Messages:
        user = self.templates.render(self._user, caption={"id": caption.id, "text": caption.text}).strip()
        return [{"role": "system", "content": self.system_text}, {"role": "user", "content": user}]

    def repair(self, messages: Messages, answer: str, error: str) -> Messages:
        """The first exchange plus the validation error, so the model fixes its own answer."""
        return [
            *messages,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": self.templates.render(self._repair, error=error).strip()},
        ]
