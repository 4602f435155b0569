"""The project's JWT parts that differ from simplejwt's and PyJWT's."""

import functools
from typing import Any

import jwt
from django.contrib.auth import get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.db.models import Model
from django.utils.translation import gettext_lazy as _
from jwt.algorithms import HMACAlgorithm
from jwt.utils import force_bytes
from rest_framework.exceptions import AuthenticationFailed
from rest_framework_simplejwt import authentication, exceptions, serializers
from rest_framework_simplejwt.settings import api_settings as jwt_settings
from rest_framework_simplejwt.tokens import Token
from rest_framework_simplejwt.utils import get_md5_hash_password

from mcp_platform.prepared import PreparedGet
from realtime.auth import user_refusal


class JWTAuthentication(authentication.JWTAuthentication):
    """simplejwt's, with the same checks and refusals (``realtime.auth.user_refusal()``, which
    the WebSocket and SSE transports share), except that the user is read with
    SQL compiled once (``mcp_platform.prepared``): built by the ORM for each request, that
    read and the task's were a quarter of the CPU of a task's PATCH."""

    def get_user(self, validated_token: Token) -> AbstractBaseUser:
        try:
            user_id = validated_token[jwt_settings.USER_ID_CLAIM]
        except KeyError:
            raise exceptions.InvalidToken(
                _("Token contained no recognizable user identification")
            ) from None
        try:
            user = _users_by(self.user_model, jwt_settings.USER_ID_FIELD).get(user_id)
        except self.user_model.DoesNotExist:
            user = None
        refusal = user_refusal(user, validated_token.get(jwt_settings.REVOKE_TOKEN_CLAIM))
        if refusal is not None:
            message, code = refusal
            raise exceptions.AuthenticationFailed(_(message), code=code)
        return user


@functools.lru_cache(maxsize=8)
def _users_by(model: type[Model], field: str) -> PreparedGet:
    return PreparedGet(lambda: model.objects.all(), field)


class TokenRefreshSerializer(serializers.TokenRefreshSerializer):
    """simplejwt's, except that a refresh token is refused (401) when its user was deleted
    (simplejwt 5.5.1 let ``DoesNotExist`` through, a 500) or, with ``CHECK_REVOKE_TOKEN``,
    has changed password since: simplejwt checks that only of access tokens, and minted
    new ones from the revoked token, each refused in turn."""

    def validate(self, attrs: dict[str, Any]) -> dict[str, str]:
        try:
            data = super().validate(attrs)
            if jwt_settings.CHECK_REVOKE_TOKEN:
                refresh = self.token_class(attrs["refresh"])  # read by super() already
                user = get_user_model().objects.get(
                    **{jwt_settings.USER_ID_FIELD: refresh[jwt_settings.USER_ID_CLAIM]}
                )
                if refresh.get(jwt_settings.REVOKE_TOKEN_CLAIM) != get_md5_hash_password(
                    user.password
                ):
                    raise AuthenticationFailed(
                        "The user's password has been changed.", "password_changed"
                    )
            return data
        except get_user_model().DoesNotExist:
            raise AuthenticationFailed(
                self.error_messages["no_active_account"], "no_active_account"
            ) from None


class CheckedOnceHMAC(HMACAlgorithm):
    """PyJWT's HMAC, which checks a secret once rather than at every signature.

    PyJWT (2.15) makes sure that a secret is no asymmetric key, against algorithm
    confusion, on every token it signs or verifies: a PEM and an SSH pattern, two attempts
    to parse it as DER and one as JSON, ~3% of a WebSocket connect's instructions
    (docs/performance.md). The answer is the same for the same secret, so it is kept for
    the few secrets a process uses; one refused is refused every time.
    """

    def prepare_key(self, key: str | bytes) -> bytes:
        if isinstance(key, str | bytes):
            return _checked_hmac_secret(force_bytes(key))  # simplejwt passes both forms
        return super().prepare_key(key)


@functools.lru_cache(maxsize=8)
def _checked_hmac_secret(key: bytes) -> bytes:
    return HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(key)  # the same for any hash


def check_hmac_secrets_once() -> None:
    """Have PyJWT sign and verify HS256, HS384 and HS512 with ``CheckedOnceHMAC``."""
    for name, hash_alg in (
        ("HS256", HMACAlgorithm.SHA256),
        ("HS384", HMACAlgorithm.SHA384),
        ("HS512", HMACAlgorithm.SHA512),
    ):
        jwt.unregister_algorithm(name)
        jwt.register_algorithm(name, CheckedOnceHMAC(hash_alg))
