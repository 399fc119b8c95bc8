"""User errors: one line `error: <what> (<key or file>): <how to fix>`, a non-zero exit, no traceback."""

from __future__ import annotations

import sys
from typing import NoReturn

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake the user can fix (bad config value, missing file). Raised before training starts."""

    def __init__(self, what: str, where: str, fix: str = "") -> None:
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.line())

    def line(self) -> str:
        text = f"error: {self.what} ({self.where})"
        return f"{text}: {self.fix}" if self.fix else text

    def exit(self) -> NoReturn:
        """For code that runs outside `lab.train.main` (before or around Hydra): the line, then exit 2."""
        print(self.line(), file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


def user_error_in(error: BaseException) -> UserError | None:
    """The UserError `error` is or wraps: one raised inside a config resolver (e.g. `${weights_meta:...}`) arrives
    inside OmegaConf's own exception."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, UserError):
        cause = cause.__cause__ or cause.__context__
    return cause
