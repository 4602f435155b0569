"""Log filters of the project's ``LOGGING``."""

import logging


class ClientFault(logging.Filter):
    """A refusal that the client's request alone decides (Django's ``DisallowedHost``: a
    ``Host`` header not in ``ALLOWED_HOSTS``) as one warning line. Django logs it as an
    error with its traceback, 14 lines per request: a scraper that names the server by its
    address wrote them on every scrape."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
        # Let through as an error, it must now pass as the warning it is.
        return logging.getLogger(record.name).isEnabledFor(logging.WARNING)
