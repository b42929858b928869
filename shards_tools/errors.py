"""Errors a user can fix. The CLI prints their message (no traceback) and exits with code 2."""


class UsageError(Exception):
    """A bad argument, config value or input path; the message names it and says how to fix it."""


EXIT_USAGE = 2
