"""The one exception type a user should ever see from calotune's command line.

Every entry point catches :class:`UserError`, prints its message on one line and exits
with status 2, so bad input never ends in a traceback. Raise it for anything the user can
fix (a file, a key, a flag), never for bugs.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, phrased so that they can fix it.

    The message should name where the problem is (file, key or flag), the rule that was
    broken, the offending value, and how to fix it.
    """

    exit_code = 2


class ServiceError(UserError):
    """A service calotune starts for the user (a local Ray, a store) could not be started.

    Not the input's fault, so the exit status is 1, not 2; still one line that says what
    failed and what to try, never a traceback, and raised before anything is written.
    """

    exit_code = 1
