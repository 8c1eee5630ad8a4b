"""The error type for a user's mistake: the command line prints it as one line, without a traceback."""


class UserError(ValueError):
    """A bad option, path or input: the message is one line that names the argument and what was expected."""
