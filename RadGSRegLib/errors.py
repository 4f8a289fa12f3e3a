"""The errors that mean "the user gave something we cannot use" (as opposed to a bug).

Every message names the file, field or option and says what was expected. The command
line turns them into one line and an exit code (:func:`RadGSRegLib.cli.main`): a
:class:`UsageError` (a bad option or combination of options) exits with 2, any other
:class:`InputError` (bad input data, an output that would destroy something, a job that
cannot succeed) with 1. Readers raise :class:`~RadGSRegLib.io.CaseFormatError`, level lookups
:class:`~RadGSRegLib.levels.LevelError`, settings :class:`~RadGSRegLib.register.ConfigError`:
all are InputErrors.
"""
from __future__ import annotations

__all__ = ["InputError", "UsageError", "OutputError", "one_line"]


class InputError(ValueError):
    """Input that cannot be used; the message names where and what was expected."""


class UsageError(InputError):
    """A command-line option, or a combination of options, that cannot be used."""


class OutputError(InputError):
    """An output location that must not be written: it is an input, lies inside one, holds
    files we did not write, or cannot be written."""


def one_line(e: BaseException) -> str:
    """An exception as one line for a user (the command line's error line, a batch's record of
    a failed case): its message with the whitespace folded, or its type when it has none;
    "interrupted" for Ctrl-C."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    return " ".join(str(e).split()) or type(e).__name__
