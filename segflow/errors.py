"""The one home of user-fixable errors.

Every error a user can fix by changing their data, params.yaml or command derives from
`UserError`. The stage runner and the CLI print these as one line (`error: ...`) and exit
1; anything else is a bug and keeps its traceback. The message says what was wrong and
how to fix it, naming the file or key.

This module is shipped in the Bento (the serving core's errors derive from it), so it
imports nothing.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user can fix: bad input data, params, paths or requests.

    A ValueError, so callers that already catch ValueError for bad input keep working.
    """
