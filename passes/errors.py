"""The error type for a caller's mistake, shared by every layer of oba_fx.

``UsageError`` marks a problem with what the caller gave (an option, a target, a file, a model the analysis
cannot handle): its message names the problem and the fix. It subclasses ``ValueError``, so code that catches
``ValueError`` keeps working. The command line prints a ``UsageError`` as one line and exits with status 2;
any other exception is a bug and shows its traceback.
"""
from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """A problem with the caller's input or options; the message names it and the fix."""
