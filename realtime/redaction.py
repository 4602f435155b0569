"""What keeps tokens out of the logs, wherever a client put them."""

import logging
import re

#: A JWT in its compact form: its header, a JSON object, always begins ``eyJ`` (``{"``).
JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")


def redact_tokens(text: str) -> str:
    """``text`` with every JWT in it replaced by ``[redacted]``."""
    return JWT.sub("[redacted]", text) if "eyJ" in text else text


class RedactTokens(logging.Filter):
    """Replaces the JWTs in a log line. A token in a parameter of another name
    (``?access_token=``) or after a ``;`` (``/events;token=``) reached Django's ``Not
    Found`` warnings and the access log whole."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "eyJ" in message:
            record.msg, record.args = redact_tokens(message), ()
        return True
