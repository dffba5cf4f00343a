"""The exception types that mean "the user asked for something impossible".

It lives at the bottom of the import chain (cli -> study -> objectives -> models) so every layer can raise it;
the CLI turns it into one line on stderr and exit code 2.
"""


class UserError(Exception):
    """Bad input from the user (config, names, files): reported as one line, exit code 2, no traceback."""


class InvalidChoice(UserError):
    """A trial's choices cannot run (impossible layer actions or shapes, a stage left with no data): the choice's
    fault, not the worker's. In a study the trial fails with the reason and the study goes on."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when it has none), cut to `limit` characters:
    what a one-line error or warning quotes from a library's multi-line message."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


def did_you_mean(name: str, choices) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice to `name`, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown(kind: str, name: str, choices) -> UserError:
    """A UserError for an unknown registry name, listing the valid names."""
    choices = sorted(str(c) for c in choices)
    return UserError(f"unknown {kind} '{name}'{did_you_mean(name, choices)}; choose from: {', '.join(choices)}")
