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
    """A mistake in the user's input; reported without a traceback.

    ``reported``: already printed by the raiser (a collective error path prints on every rank
    and waits at a barrier before raising, so that no rank's exit makes the launcher kill the
    others before they have printed); :func:`cli_main` then only exits."""

    reported = False


def cli_main(fn: Callable[..., int | None]) -> Callable[..., int]:
    """Decorator for entry points: ``UserError`` -> ``error: ...`` on stderr, exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            rc = fn(*args, **kwargs)
        except UserError as e:
            if not e.reported:
                sys.stderr.write(f"error: {e}\n")  # one write: ranks sharing a pipe do not interleave
                sys.stderr.flush()
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        sys.exit(rc or 0)

    return wrapper
