"""The one contract every engine meets: messages in, a completion out, asynchronously.

Engines know nothing of captions, validation or the store; gen.generate drives them.
The decoding constraint (a JSON schema) and sampling parameters are fixed at construction;
a request may bring its own schema (the judge's: exactly as many grades as queries asked).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Completion:
    text: str                   # the answer text ("" when the model gave none)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    refusal: Optional[str] = None
    finish_reason: Optional[str] = None
    server: Optional[str] = None    # which server answered, where an engine has several


def printable(value: Any, limit: int = 200) -> str:
    """Untrusted text for a message: bounded, a lone surrogate escaped (it cannot be written
    to a UTF-8 file)."""
    return str(value)[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


class EngineError(RuntimeError):
    """A request that could not be answered: retries exhausted or a fatal server reply.

    Not the caption's fault, so nothing is stored and a rerun asks again.
    """


class EngineUnusable(RuntimeError):
    """No request can be answered: every server refused the key, the account or the model, or
    none could be reached for longer than retries would wait.

    Not an EngineError, which is one request's failure: this one stops the run (gen.run exits 1,
    publishes nothing; stored answers stay and a rerun resumes).
    """


class Engine(ABC):
    name: str

    @abstractmethod
    async def complete(self, messages: list[dict[str, str]], schema: Optional[dict] = None) -> Completion:
        """schema: this request's decoding constraint; None: the engine's own."""
        ...

    def checked(self, done: Completion, valid: bool) -> bool:
        """Told whether `done` validated. True when it did not and its source's answers fail
        far more often than its peers' (gen.engines.pool): the answer says more of the source
        than of the caption."""
        return False

    async def aclose(self) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        """What the manifest records about how answers were obtained."""
        return {"engine": self.name}
