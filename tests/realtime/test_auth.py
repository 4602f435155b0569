import asyncio
import time

import jwt
import pytest
from asgiref.sync import async_to_sync
from django.conf import settings
from django.test import override_settings
from rest_framework.exceptions import APIException
from rest_framework_simplejwt.authentication import JWTAuthentication
from rest_framework_simplejwt.tokens import AccessToken, RefreshToken
from rest_framework_simplejwt.utils import get_md5_hash_password

from realtime.auth import authenticate_token
from tests.conftest import token_for

# authenticate_token() reads users through database_sync_to_async, which a test
# transaction cannot survive.
pytestmark = pytest.mark.django_db(transaction=True)

authenticate = async_to_sync(authenticate_token)


def simplejwt_accepts(raw_token: str | None) -> bool:
    """What simplejwt's own REST authentication says of a token."""
    authentication = JWTAuthentication()
    try:
        authentication.get_user(authentication.get_validated_token(raw_token.encode()))
    except (APIException, AttributeError):
        return False
    return True


def test_valid_access_token_gives_the_user_and_its_expiry(user):
    token = AccessToken.for_user(user)
    credentials = authenticate(str(token))
    assert (credentials.user, credentials.expires_at) == (user, token["exp"])
    assert credentials.user_claim == token["user_id"]


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
    token = make_token(user)
    with pytest.raises(ValueError) as caught:
        authenticate(token)
    assert str(caught.value)
    assert not simplejwt_accepts(token)


def test_inactive_user_is_refused(make_user):
    inactive = make_user(is_active=False)
    with pytest.raises(ValueError, match="inactive"):
        authenticate(str(AccessToken.for_user(inactive)))


def test_token_without_a_user_claim_is_refused():
    claims = {"token_type": "access", "exp": int(time.time()) + 60, "jti": "d"}
    with pytest.raises(ValueError, match="user identification"):
        authenticate(signed(claims))


def test_a_user_id_claim_of_the_wrong_type_is_refused():
    claims = {"token_type": "access", "exp": int(time.time()) + 60, "jti": "e", "user_id": "x"}
    with pytest.raises(ValueError, match="User not found"):
        authenticate(signed(claims))


def test_a_changed_password_revokes_tokens_when_simplejwt_is_told_to(user):
    jwt_settings = {**settings.SIMPLE_JWT, "CHECK_REVOKE_TOKEN": True}
    token = AccessToken.for_user(user)
    token["hash_password"] = get_md5_hash_password(user.password)
    with override_settings(SIMPLE_JWT=jwt_settings):
        assert authenticate(str(token)).user == user
        user.set_password("another-password")
        user.save()
        with pytest.raises(ValueError, match="password has been changed"):
            authenticate(str(token))


def test_users_connecting_together_are_read_in_one_query(make_user, django_assert_num_queries):
    users = [make_user() for _ in range(20)]

    async def together():
        return await asyncio.gather(*(authenticate_token(token_for(u)) for u in users))

    with django_assert_num_queries(1):
        assert [c.user for c in async_to_sync(together)()] == users
