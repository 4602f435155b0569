"""Authentication and origin checks for the WebSocket and SSE transports."""

from typing import Any
from urllib.parse import parse_qs

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.security.websocket import OriginValidator
from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.models import AnonymousUser
from rest_framework.exceptions import APIException
from rest_framework_simplejwt.authentication import JWTAuthentication


def get_user_for_token(raw_token: Any) -> AbstractBaseUser:
    """The active user an access token names, validated as simplejwt's REST
    authentication does (signature, expiry, token type, user exists and is active).

    Raises ``ValueError`` with the reason on any failure.
    """
    if not isinstance(raw_token, str) or not raw_token:
        raise ValueError("No token given.")
    authentication = JWTAuthentication()
    try:
        token = authentication.get_validated_token(raw_token.encode())
        return authentication.get_user(token)
    except APIException as exc:
        raise ValueError(
            str(exc.detail if isinstance(exc.detail, str) else exc.default_detail)
        ) from None


def authenticate_websocket(token: Any) -> int:
    """The id of the active user an access token names; ``ValueError`` on failure."""
    return get_user_for_token(token).pk


def query_token(scope: dict[str, Any]) -> str | None:
    """The ``token`` query parameter of a connection, if any."""
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
    return values[-1] if values else None


class TokenAuthMiddleware:
    """Authenticates a connection by its ``?token=``, or else by its session.

    A token that fails validation leaves an anonymous user, even beside a valid session:
    a client that sends bad credentials is refused rather than silently downgraded. A
    token skips the session lookup, which saves a database round trip per connection.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.session_inner = AuthMiddlewareStack(inner)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        token = query_token(scope)
        if token is None:
            return await self.session_inner(scope, receive, send)
        try:
            user = await database_sync_to_async(get_user_for_token)(token)
        except ValueError:
            user = AnonymousUser()
        return await self.inner(dict(scope, user=user), receive, send)


class OptionalOriginValidator(OriginValidator):
    """Channels' origin check, except that a handshake without ``Origin`` passes.

    Browsers always send ``Origin``, and the check exists to protect them; services and
    command-line clients send none and hold their credentials themselves.
    """

    def valid_origin(self, parsed_origin: Any) -> bool:
        if parsed_origin is None:
            return True
        return super().valid_origin(parsed_origin)


def allowed_hosts_origin_validator(application: Any) -> OptionalOriginValidator:
    allowed = list(settings.ALLOWED_HOSTS)
    if settings.DEBUG and not allowed:
        allowed = ["localhost", "127.0.0.1", "[::1]"]
    return OptionalOriginValidator(application, allowed)


def websocket_auth_stack(application: Any) -> Any:
    """Origin check, then ``?token=`` or session authentication."""
    return allowed_hosts_origin_validator(TokenAuthMiddleware(application))
