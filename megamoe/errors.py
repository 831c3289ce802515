"""User-facing errors and the CLI guard that turns them into one clear line and exit code 2.

Raise :class:`UserError` for anything the user can fix (a missing file, a bad value): the
message must name the file/field/value and say what to do. Programming errors stay
ordinary exceptions and keep their tracebacks.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable


class UserError(Exception):
    """A mistake in the user's input; reported without a traceback."""


def cli_main(fn: Callable[..., int | None]) -> Callable[..., int]:
    """Decorator for entry points: ``UserError`` -> ``error: ...`` on stderr, exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            rc = fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        sys.exit(rc or 0)

    return wrapper
