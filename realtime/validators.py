"""Validators for JSON that the real-time layer stores or sends."""

import math
from typing import Any

from django.core.exceptions import ValidationError


def validate_transportable_json(value: Any, *, max_depth: int = 32) -> None:
    """Refuse what JSON allows but a transport or the database cannot carry: NUL (which
    PostgreSQL's jsonb refuses), lone surrogates (not UTF-8, so no frame can carry them),
    non-finite numbers, and nesting deeper than ``max_depth``."""
    _check(value, 0, max_depth)


def _check(value: Any, depth: int, max_depth: int) -> None:
    if depth > max_depth:
        raise ValidationError(f"Values may nest at most {max_depth} levels.", code="invalid")
    if isinstance(value, dict):
        for key, item in value.items():
            _check(key, depth, max_depth)
            _check(item, depth + 1, max_depth)
    elif isinstance(value, list):
        for item in value:
            _check(item, depth + 1, max_depth)
    elif isinstance(value, str):
        if "\x00" in value or (not value.isascii() and not _is_utf8(value)):
            raise ValidationError(
                "Text must not contain NUL characters or lone surrogates.", code="invalid"
            )
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValidationError("Numbers must be finite.", code="invalid")


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
