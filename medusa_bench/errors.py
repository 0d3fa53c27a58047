"""One exception type for mistakes a user can fix; the CLI prints it as one line."""


class UserError(Exception):
    """Bad input or configuration: the message says what is wrong and what to do."""


def unknown_name(kind: str, name: str, valid) -> UserError:
    """The registry error: 'unknown decoder 'x'; valid names are: a, b'."""
    return UserError(f"unknown {kind} {name!r}; valid names are: {', '.join(sorted(valid))}")
