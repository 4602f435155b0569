"""What keeps tokens out of the logs, wherever a client put them."""

import logging
import re

#: A JWT in its compact form, its dots percent-encoded or not: its header, a JSON object,
#: always begins ``eyJ`` (``{"``). Not within a longer word (``surveyJS.min.js``), which
#: also keeps the search linear: a run of ``eyJ`` is scanned from its start only.
JWT = re.compile(
    r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]+(?:\.|%2[Ee])[A-Za-z0-9_-]+(?:\.|%2[Ee])[A-Za-z0-9_-]*"
)


def redact_tokens(text: str) -> str:
    """``text`` with every JWT in it replaced by ``[redacted]``."""
    return JWT.sub("[redacted]", text) if "eyJ" in text else text


class RedactingFormatter(logging.Formatter):
    """Writes log lines with their JWTs replaced, tracebacks included. A token in a
    parameter of another name (``?access_token=``) or after a ``;`` (``/events;token=``)
    reached Django's ``Not Found`` warnings whole."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_tokens(super().format(record))
