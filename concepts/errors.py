"""Typed exceptions for user input.

Every error a user can cause derives from :class:`ConceptSurrogateError`. Its message is one line that
says what was given, what was expected and, where possible, the fix; the command line prints it without
a traceback and exits with status 2.
"""

from __future__ import annotations

import difflib


class ConceptSurrogateError(Exception):
    """Base class of every error caused by user input (bad file, option or value)."""


class InputError(ConceptSurrogateError, ValueError):
    """A file, folder, table or option value is missing or malformed."""


class LayerNotFoundError(ConceptSurrogateError, KeyError):
    """A requested layer is not a module of the teacher."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TeacherError(ConceptSurrogateError, ValueError):
    """A teacher specification cannot be loaded or probed."""


class NotFittedError(ConceptSurrogateError, AttributeError):
    """A method that needs a fitted object was called before ``fit``."""


def closest(name: str, candidates, n: int = 3) -> list[str]:
    """Return up to ``n`` candidates closest to ``name`` (difflib ratio), best first."""
    candidates = list(candidates)
    found = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if not found:
        # fall back to names sharing the leading component ("layer3.9" -> "layer3.*")
        head = name.split(".")[0]
        found = [c for c in candidates if c.split(".")[0] == head][:n]
    return found


def did_you_mean(name: str, candidates, n: int = 3) -> str:
    """A ``" Did you mean 'a', 'b'?"`` suffix, or an empty string when nothing is close."""
    found = closest(name, candidates, n=n)
    if not found:
        return ""
    return " Did you mean " + ", ".join(f"'{c}'" for c in found) + "?"
