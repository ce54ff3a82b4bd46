"""The one error handler of every command (``imprompt ...``, ``python -m imprompt.demo`` and the
sub-commands with parsers of their own), below the CLI so that each of them can use it.

Errors a user can cause are ``ValueError`` or ``FileNotFoundError`` subclasses throughout the package
(CheckpointError, ImageInputError, UnsafeFileError, PickleRefusedError, ConfigError; ModelNotFoundError):
they print as one escaped line and exit 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable

USER_ERRORS = (ValueError, FileNotFoundError)


def one_line(err: BaseException) -> str:
    """An exception's message on one line, safe to print on a terminal."""
    from .generation.pnginfo import escape_controls

    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip()) or type(err).__name__
    return escape_controls(text)


def guarded(command: str, run: Callable[[], int | None]) -> int:
    """Run a command; a user's error becomes ``imprompt COMMAND: error: ...`` on stderr and exit status 2."""
    try:
        return run() or 0
    except USER_ERRORS as err:
        print(f"imprompt {command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"imprompt {command}: interrupted", file=sys.stderr)
        return 130
