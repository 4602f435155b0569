import time

import jwt
import pytest
from django.conf import settings
from rest_framework_simplejwt.tokens import AccessToken, RefreshToken

from realtime.auth import authenticate_websocket
from tests.conftest import token_for

pytestmark = pytest.mark.django_db


def test_valid_access_token_gives_the_user_id(user):
    assert authenticate_websocket(token_for(user)) == user.pk


def signed(claims: dict, key: str = settings.SIMPLE_JWT["SIGNING_KEY"]) -> str:
    return jwt.encode(claims, key, algorithm="HS256")


@pytest.mark.parametrize(
    "make_token",
    [
        lambda user: None,
        lambda user: "",
        lambda user: "not.a.jwt",
        lambda user: str(RefreshToken.for_user(user)),
        lambda user: signed(
            {
                "token_type": "access",
                "exp": int(time.time()) - 10,
                "jti": "a",
                "user_id": str(user.pk),
            }
        ),
        lambda user: signed(
            {
                "token_type": "access",
                "exp": int(time.time()) + 60,
                "jti": "b",
                "user_id": str(user.pk),
            },
            key="another-key-of-at-least-thirty-two-bytes!",
        ),
        lambda user: signed(
            {
                "token_type": "access",
                "exp": int(time.time()) + 60,
                "jti": "c",
                "user_id": "999999999",
            }
        ),
    ],
    ids=["none", "empty", "garbage", "refresh", "expired", "wrong-signature", "unknown-user"],
)
def test_invalid_tokens_raise_value_error_with_a_reason(user, make_token):
    with pytest.raises(ValueError) as caught:
        authenticate_websocket(make_token(user))
    assert str(caught.value)


def test_inactive_user_is_refused(make_user):
    inactive = make_user(is_active=False)
    with pytest.raises(ValueError):
        authenticate_websocket(str(AccessToken.for_user(inactive)))
