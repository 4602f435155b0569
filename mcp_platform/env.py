"""Typed reads of the process environment; the settings module is their only caller.

A variable set to an empty (or blank) value means its default, as if unset: a deployment
template's ``DJANGO_SECURE_COOKIES=${SECURE}`` with nothing in ``SECURE`` turned the
cookies' Secure flag off, and an empty ``DJANGO_ALLOWED_HOSTS`` refused every request.
"""

import os

from django.core.exceptions import ImproperlyConfigured

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off"}


def _raw(name: str) -> str | None:
    """The variable's value, or ``None`` if it is unset or blank."""
    raw = os.environ.get(name)
    return raw if raw is not None and raw.strip() else None


def env_str(name: str, default: str = "") -> str:
    raw = _raw(name)
    return default if raw is None else raw


def env_bool(name: str, default: bool) -> bool:
    raw = _raw(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (1/0, true/false), not {raw!r}.")


def env_int(name: str, default: int, minimum: int | None = None, maximum: int | None = None) -> int:
    raw = _raw(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, not {raw!r}.") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, not {value}.")
    if maximum is not None and value > maximum:
        raise ImproperlyConfigured(f"{name} must be at most {maximum}, not {value}.")
    return value


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    """One of ``choices``, given in any case."""
    raw = _raw(name)
    if raw is None:
        return default
    by_upper = {choice.upper(): choice for choice in choices}
    try:
        return by_upper[raw.strip().upper()]
    except KeyError:
        raise ImproperlyConfigured(
            f"{name} must be one of {', '.join(choices)}, not {raw!r}."
        ) from None


def env_list(name: str, default: list[str]) -> list[str]:
    raw = _raw(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_prefixed(prefix: str) -> dict[str, str]:
    """Every variable named ``PREFIX…`` that has a value, keyed by the rest of its name: an
    empty one means the default, as for every other variable."""
    return {
        name[len(prefix) :]: value
        for name, value in os.environ.items()
        if name.startswith(prefix) and _raw(name) is not None
    }
