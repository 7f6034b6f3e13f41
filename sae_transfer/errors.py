"""One exception type for mistakes a user can fix; the CLI prints it as one line."""


class UserError(ValueError):
    """Bad input: the message says what is wrong and how to fix it, on one line."""
