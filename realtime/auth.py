"""Authentication and origin checks for the WebSocket and SSE transports."""

import io
import logging
from collections.abc import Callable
from importlib import import_module
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlparse, urlsplit

from channels.auth import AuthMiddleware
from channels.auth import get_user as get_session_user
from channels.db import database_sync_to_async
from channels.security.websocket import OriginValidator, WebsocketDenier
from channels.sessions import CookieMiddleware, SessionMiddleware
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.models import AnonymousUser
from django.core.exceptions import DisallowedHost, ValidationError
from django.core.handlers.asgi import ASGIRequest
from django.db import DatabaseError
from django.utils.http import is_same_domain
from rest_framework.exceptions import APIException
from rest_framework_simplejwt import settings as simplejwt_settings
from rest_framework_simplejwt.authentication import JWTAuthentication
from rest_framework_simplejwt.tokens import Token
from rest_framework_simplejwt.utils import get_md5_hash_password

from realtime.batching import Batcher
from realtime.failures import failure_text

logger = logging.getLogger(__name__)


def validated_token(raw_token: Any) -> Token:
    """The access token in ``raw_token``, its signature, expiry and type checked by
    simplejwt; ``ValueError`` with the reason otherwise. Needs no database."""
    if not isinstance(raw_token, str) or not raw_token:
        raise ValueError("No token given.")
    try:
        return JWTAuthentication().get_validated_token(raw_token.encode())
    except APIException as exc:
        raise ValueError(refusal_reason(exc)) from None


def refusal_reason(exc: APIException) -> str:
    """What simplejwt says is wrong with a token (expired, of the wrong type, invalid): a
    token of no accepted type carries the reason in its ``messages``, one per type, under a
    generic ``detail``."""
    detail = exc.detail
    if not isinstance(detail, dict):
        return str(detail)
    messages = detail.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        return str(messages[0].get("message", exc.default_detail))
    return str(detail.get("detail", exc.default_detail))


def _users(user_ids: list[Any]) -> list[AbstractBaseUser | None]:
    """The users with these ids (simplejwt's ``USER_ID_FIELD``), in one query."""
    model = get_user_model()
    field = model._meta.get_field(simplejwt_settings.api_settings.USER_ID_FIELD)
    keys = []
    for user_id in user_ids:
        try:
            keys.append(field.to_python(user_id))
        except ValidationError:
            keys.append(None)
    found = model._default_manager.in_bulk(
        {key for key in keys if key is not None}, field_name=field.name
    )
    return [found.get(key) for key in keys]


_user_batcher: Batcher[Any, AbstractBaseUser | None] = Batcher(database_sync_to_async(_users))


class Credentials(NamedTuple):
    user: AbstractBaseUser
    #: When the token expires (its ``exp``, in seconds since the epoch).
    expires_at: float
    #: The token's user id and password claims, to check the user against again when
    #: their access changes (``token_user()``).
    user_claim: Any
    password_claim: Any


async def authenticate_token(raw_token: Any) -> Credentials:
    """The user an access token names, and when it expires, checked as simplejwt's REST
    authentication checks it: signature, expiry, token type, then the user
    (``token_user()``). Raises ``ValueError`` with the reason on any failure.
    """
    jwt_settings = simplejwt_settings.api_settings  # replaced when settings change
    token = validated_token(raw_token)
    try:
        user_claim = token[jwt_settings.USER_ID_CLAIM]
    except KeyError:
        raise ValueError("Token contained no recognizable user identification") from None
    password_claim = token.get(jwt_settings.REVOKE_TOKEN_CLAIM)
    user = await token_user(user_claim, password_claim)
    return Credentials(user, float(token["exp"]), user_claim, password_claim)


async def token_user(user_claim: Any, password_claim: Any) -> AbstractBaseUser:
    """The user a valid token's claims name, as simplejwt's REST authentication checks
    them (``user_refusal()``). ``ValueError`` with the reason otherwise.

    The user is read fresh from the database, together with those of other connections
    asking at the same moment (``realtime.batching``)."""
    user = await _user_batcher.load(user_claim)
    refusal = user_refusal(user, password_claim)
    if refusal is not None:
        raise ValueError(refusal[0])
    return user


def user_refusal(user: AbstractBaseUser | None, password_claim: Any) -> tuple[str, str] | None:
    """Why simplejwt's REST authentication refuses the user a valid token names, as its
    message and code; ``None`` if it takes them. The user must exist, be active and, with
    ``CHECK_REVOKE_TOKEN``, have the password the token was issued with."""
    jwt_settings = simplejwt_settings.api_settings
    if user is None:
        return "User not found", "user_not_found"
    if jwt_settings.CHECK_USER_IS_ACTIVE and not user.is_active:
        return "User is inactive", "user_inactive"
    if jwt_settings.CHECK_REVOKE_TOKEN and password_claim != get_md5_hash_password(user.password):
        return "The user's password has been changed.", "password_changed"
    return None


async def session_user(session_key: str | None) -> AbstractBaseUser | None:
    """The user the session authenticates now, as Django's authentication would find them
    for a request: the session exists and has not expired (a logout deletes it), and names
    an active user whose password is the one the session was made with; else ``None``.
    Read afresh: the connection's own session object keeps what it read at connecting."""
    if not session_key:
        return None
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    user = await get_session_user({"session": store})
    return user if user.is_authenticated else None


class SessionAuthMiddleware(AuthMiddleware):
    """Channels' session authentication, except that a session or user the database cannot
    read leaves an anonymous user and ``scope["auth_unavailable"]``, as a token's does: the
    failure escaped, a 500 and a logged traceback for every request while it was away."""

    async def resolve_scope(self, scope: dict[str, Any]) -> None:
        try:
            await super().resolve_scope(scope)
        except DatabaseError as exc:
            logger.warning("Could not read a connection's session: %s", failure_text(exc))
            scope["user"]._wrapped = AnonymousUser()
            scope["auth_unavailable"] = True


def the_token(tokens: list[str]) -> str | None:
    """The token given, however many times; ``None`` if none was. Different tokens are
    refused (``ValueError``): one bad beside a good one would otherwise be dropped
    unseen, and bad credentials are never silently replaced by others."""
    if len(set(tokens)) > 1:
        raise ValueError("More than one token given.")
    return tokens[0] if tokens else None


def query_tokens(scope: dict[str, Any]) -> list[str]:
    """The ``token`` query parameters of a connection; an empty one is a token that will
    fail, not an absent one."""
    query = scope.get("query_string", b"").decode("latin-1")
    return parse_qs(query, keep_blank_values=True).get("token", [])


def query_token(scope: dict[str, Any]) -> str | None:
    """The token of the ``token`` query parameter (``the_token()``)."""
    return the_token(query_tokens(scope))


def bearer_tokens(scope: dict[str, Any]) -> list[str]:
    """The tokens of the request's ``Authorization`` headers of simplejwt's type
    (``Bearer``), read as the REST API reads one: split on whitespace, and a header without
    exactly one token is refused (``ValueError``) with the REST API's reason. (Taken for an
    empty token, it was refused as "No token given.", or beside a ``?token=`` as "More than
    one token given.") Other schemes are ignored, as the REST API ignores them. Every such
    header counts: one bad after a good one was dropped unseen."""
    types = simplejwt_settings.api_settings.AUTH_HEADER_TYPES
    if isinstance(types, str):  # simplejwt takes one type or several
        types = (types,)
    tokens = []
    for name, value in scope.get("headers", ()):
        if name.lower() == b"authorization":
            parts = value.decode("latin-1").split()
            if parts and parts[0] in types:
                if len(parts) != 2:
                    raise ValueError("Authorization header must contain two space-delimited values")
                tokens.append(parts[1])
    return tokens


def header_or_query_token(scope: dict[str, Any]) -> str | None:
    """The token of the ``Authorization: Bearer`` headers or of the query
    (``the_token()``): for HTTP, where clients that can send a header should, and
    ``EventSource``, which cannot, uses the query."""
    return the_token([*query_tokens(scope), *bearer_tokens(scope)])


class TokenAuthMiddleware:
    """Authenticates a connection by its token (``token_of(scope)``), or else by its session.

    A token that fails validation leaves an anonymous user, even beside a valid session:
    a client that sends bad credentials is refused rather than silently downgraded. The
    reason goes in ``scope["auth_failure"]``, for endpoints that can tell the client. A
    token skips the session lookup, which saves a database round trip per connection.
    A valid token's ``Credentials`` go in ``scope["auth_credentials"]``: the connection ends
    when it expires, or when its user's access changes so that it no longer holds
    (``InboxConsumerMixin.watch_credentials()``).
    """

    def __init__(
        self,
        inner: Any,
        token_of: Callable[[dict[str, Any]], str | None] = query_token,
        session_guard: Callable[[Any], Any] | None = None,
    ) -> None:
        self.inner = inner
        self.token_of = token_of
        self.session_inner = CookieMiddleware(SessionMiddleware(SessionAuthMiddleware(inner)))
        if session_guard is not None:  # checks what a session would authenticate
            self.session_inner = session_guard(self.session_inner)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        failure = credentials = None
        unavailable = False
        try:
            token = self.token_of(scope)
            if token is not None:
                credentials = await authenticate_token(token)
                user = credentials.user
        except ValueError as exc:
            token, user, failure = "", AnonymousUser(), str(exc)
        except DatabaseError as exc:
            # The token's user could not be read: the endpoint says so (503, or 4503)
            # rather than fail with a 500 and a traceback.
            logger.warning("Could not read a connection's user: %s", failure_text(exc))
            token, user, unavailable = "", AnonymousUser(), True
        if token is None:
            return await self.session_inner(scope, receive, send)
        scope = dict(
            scope,
            user=user,
            auth_failure=failure,
            auth_credentials=credentials,
            auth_unavailable=unavailable,
        )
        return await self.inner(scope, receive, send)


class OptionalOriginValidator(OriginValidator):
    """Channels' origin check, except that a handshake without ``Origin`` passes, and so
    does one from ``CSRF_TRUSTED_ORIGINS``.

    Browsers always send ``Origin``, and the check exists to protect them; services and
    command-line clients send none and hold their credentials themselves. A trusted origin
    may open a session's WebSocket (``own_origin()``), so it passes here too, whatever its
    host.
    """

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        """Channels' check, except that an ``Origin`` that is no URL (an unclosed IPv6
        bracket) is refused: Channels' raised ``ValueError``, a 500."""
        origin = text = None
        for name, value in scope.get("headers", ()):
            if name == b"origin":
                text = value.decode("latin-1")
                try:
                    origin = urlparse(text)
                except ValueError:
                    return await WebsocketDenier()(scope, receive, send)
        if self.valid_origin(origin) or (text is not None and trusted_origin(text)):
            return await self.application(scope, receive, send)
        return await WebsocketDenier()(scope, receive, send)

    def valid_origin(self, parsed_origin: Any) -> bool:
        if parsed_origin is None:
            return True
        return super().valid_origin(parsed_origin)


def own_origin(scope: dict[str, Any], origin: str) -> bool:
    """Whether ``origin`` is the origin the request reached, or one of
    ``CSRF_TRUSTED_ORIGINS``: the rule of Django's CSRF protection, with the host and port
    read as Django reads a request's (``ALLOWED_HOSTS``), and the scheme from the scope
    (``realtime.server.websocket_scheme()``)."""
    scheme = "https" if scope.get("scheme") in ("wss", "https") else "http"
    # Only the headers and scheme count: the query, undecodable bytes and all, is left out.
    request = ASGIRequest(
        {**scope, "method": "GET", "scheme": scheme, "query_string": b""}, io.BytesIO()
    )
    try:
        own = f"{'https' if request.is_secure() else 'http'}://{request.get_host()}"
    except DisallowedHost:
        own = None
    return origin == own or trusted_origin(origin)


def trusted_origin(origin: str) -> bool:
    """Whether ``origin`` is one of ``CSRF_TRUSTED_ORIGINS``, wildcards as Django reads them
    (``https://*.example.com``: that host and its subdomains, over ``https``)."""
    trusted = settings.CSRF_TRUSTED_ORIGINS
    if origin in trusted:
        return True
    try:
        parsed = urlsplit(origin)
    except ValueError:
        return False
    wildcards = (urlsplit(pattern) for pattern in trusted if "*" in pattern)
    return any(
        pattern.scheme == parsed.scheme
        and is_same_domain(parsed.netloc, pattern.netloc.removeprefix("*"))
        for pattern in wildcards
    )


class OwnOriginValidator:
    """Refuses a WebSocket handshake whose ``Origin`` is not the server's own
    (``own_origin()``), as Django refuses such a form post. A browser sends a site's session
    cookie with a handshake from any page of the same site (another port, or plain
    ``http``), and the host check of ``ALLOWED_HOSTS`` let those through: the page's script
    then held the user's session. A handshake without ``Origin`` is not a browser's, and
    passes."""

    def __init__(self, application: Any) -> None:
        self.application = application

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        origins = [value for name, value in scope.get("headers", ()) if name == b"origin"]
        if all(own_origin(scope, origin.decode("latin-1")) for origin in origins):
            return await self.application(scope, receive, send)
        return await WebsocketDenier()(scope, receive, send)


def allowed_hosts_origin_validator(application: Any) -> OptionalOriginValidator:
    allowed = list(settings.ALLOWED_HOSTS)
    if settings.DEBUG and not allowed:
        allowed = ["localhost", "127.0.0.1", "[::1]"]
    return OptionalOriginValidator(application, allowed)


def websocket_auth_stack(application: Any) -> Any:
    """Origin check, then ``?token=`` or session authentication; a session's handshake
    must come from the server's own origin."""
    return allowed_hosts_origin_validator(
        TokenAuthMiddleware(application, session_guard=OwnOriginValidator)
    )


def http_auth_stack(application: Any) -> Any:
    """``Authorization: Bearer``, ``?token=`` or session authentication."""
    return TokenAuthMiddleware(application, token_of=header_or_query_token)
