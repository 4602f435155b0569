"""What keeps tokens out of the logs, wherever a client put them."""

import logging
import re
from urllib.parse import unquote_plus

#: A JWT in its compact form, its dots percent-encoded or not: its header, a JSON object,
#: always begins ``eyJ`` (``{"``). Not within a longer word (``surveyJS.min.js``), which
#: also keeps the search linear: a run of ``eyJ`` is scanned from its start only.
JWT = re.compile(
    r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]+(?:\.|%2[Ee])[A-Za-z0-9_-]+(?:\.|%2[Ee])[A-Za-z0-9_-]*"
)


def redact_tokens(text: str) -> str:
    """``text`` with every JWT in it replaced by ``[redacted]``."""
    return JWT.sub("[redacted]", text) if "eyJ" in text else text


def redact(path: str) -> str:
    """``path`` with the value of each ``token`` query parameter replaced, its name read
    as the server reads it (``%74oken`` is ``token`` too), and as a client might have
    mistyped it (``token+=``, ``Token=``, ``token%3D…``, ``x=1;token=…``, ``x=1%26token=…``):
    those are no token to the server, but what follows them may well be one. A JWT
    anywhere else in it is replaced too (``redact_tokens()``)."""
    path = redact_tokens(path)
    base, mark, query = path.partition("?")
    if not mark:
        return path
    parameters = []
    for parameter in query.split("&"):
        pieces = re.split("[&;]", unquote_plus(parameter))
        if any(piece.partition("=")[0].strip().lower() == "token" for piece in pieces):
            name, equals, _ = parameter.partition("=")
            parameter = f"{name}=[redacted]" if equals else "[redacted]"
        parameters.append(parameter)
    return f"{base}?{'&'.join(parameters)}"


class RedactingFormatter(logging.Formatter):
    """Writes log lines with their JWTs replaced, tracebacks included. A token in a
    parameter of another name (``?access_token=``) or after a ``;`` (``/events;token=``)
    reached Django's ``Not Found`` warnings whole."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_tokens(super().format(record))
