"""User-facing errors: one line on stderr and exit code 2, never a traceback.

Each layer raises its own subclass of ``UserError`` (bad config, missing data, missing
model, unavailable kernels, diverged training); ``report`` prints it.  Set
``DPZO_DEBUG=1`` to get the traceback as well.
"""

from __future__ import annotations

import os
import sys
import traceback


class UserError(Exception):
    """A problem the user can fix; its message is the whole report."""


class ConfigError(UserError, ValueError):
    """Invalid user input (flags, config file, run directory): reported as one line, exit code 2."""


class RunDirError(ConfigError):
    """A run directory that cannot be used as it is: locked by another process, not writable, short of
    space, or damaged (the message names the file)."""


class TrainingDiverged(UserError):
    """The weights (or a loss) left the range where training means anything; nothing after the last good
    step was saved."""


def report(exc: BaseException, code: int = 2) -> int:
    if os.environ.get("DPZO_DEBUG") == "1":
        traceback.print_exception(exc)
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(f"error: {message}", file=sys.stderr)
    return code
