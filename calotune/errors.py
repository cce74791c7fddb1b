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
