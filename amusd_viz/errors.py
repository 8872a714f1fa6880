"""Errors a user can cause. The CLI turns them into one message and exit code 2."""


class UserError(Exception):
    """A mistake the user can fix: the message names the problem and the way out."""

    exit_code = 2


class RunFailed(Exception):
    """A run that failed for a reason other than user input (a worker died, ...): exit code 1."""

    exit_code = 1
