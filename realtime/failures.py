"""How failures of the services the layer depends on (Redis, the database) are logged."""


def failure_text(exc: BaseException) -> str:
    """An exception on one line, with its reason: redis-py's ``repr()`` of one is only its
    kind (``network:ConnectionError``), which told an operator nothing of why. Outages are
    logged in one such line per failure, not with a traceback: during one, every client
    fails at once, and each may try again every few seconds."""
    reason = reason_of(exc)
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__


def reason_of(exc: BaseException) -> str:
    """An exception's message on one line: a database's runs over several, which broke a
    command's one-line error and a log line alike."""
    return " ".join(str(exc).split())
