"""The exception types that mean "the user asked for something impossible".

It lives at the bottom of the import chain (cli -> study -> objectives -> models) so every layer can raise it;
the CLI turns it into one line on stderr and exit code 2.
"""

import re


class UserError(Exception):
    """Bad input from the user (config, names, files): reported as one line, exit code 2, no traceback."""


class InvalidChoice(UserError):
    """A trial's choices cannot run (impossible layer actions or shapes, a stage left with no data): the choice's
    fault, not the worker's. In a study the trial fails with the reason and the study goes on."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when it has none), passwords masked, cut to
    `limit` characters: what a one-line error or warning quotes from a library's multi-line message (drivers quote
    their connection URL or DSN)."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return mask_secrets(line)[:limit]  # masked before cutting: no half password shows


# `scheme://` then everything up to whitespace or a quote: a URL inside a message (an unescaped '@' or ':' in a
# password stays inside the token).
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*")
# `password=...` in a query string or a libpq DSN (`host=h password=p`), under any of its usual names.
_SECRET_PARAM = re.compile(r"(?i)\b([\w.-]*(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key)"
                           r"[\w.-]*=)([^&\s'\"]*)")


def mask_userinfo(url: str) -> str:
    """`scheme://user:secret@host...` -> `scheme://user:***@host...`, whatever the secret holds: the user info is
    taken to end at the URL's LAST '@', so an unescaped '@', '/' or '?' in a password is masked too (an '@' further
    on, in a query, only masks more than needed), and so is a password with an empty user."""
    head, sep, rest = url.partition("://")
    if not sep or rest.startswith("/"):  # no authority (sqlite:///path, file:///path)
        return url
    at = rest.rfind("@")
    if at < 0:
        return url
    user, colon, _ = rest[:at].partition(":")
    return f"{head}://{user}:***{rest[at:]}" if colon else url


def mask_secrets(text: str) -> str:
    """Every password in `text` replaced by `***`: the user info of any URL in it (`user:***@`) and
    `password=***`-style parameters of query strings and DSNs. For any text shown or logged: errors, warnings."""
    return _SECRET_PARAM.sub(r"\1***", _URL.sub(lambda m: mask_userinfo(m.group(0)), text))


def did_you_mean(name: str, choices) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice to `name`, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown(kind: str, name: str, choices) -> UserError:
    """A UserError for an unknown registry name, listing the valid names."""
    choices = sorted(str(c) for c in choices)
    return UserError(f"unknown {kind} '{name}'{did_you_mean(name, choices)}; choose from: {', '.join(choices)}")
