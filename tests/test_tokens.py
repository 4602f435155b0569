"""PyJWT checks an HMAC secret once per process, and refuses the same secrets as before; the
API's token authentication answers as simplejwt's."""

import secrets

import jwt
import pytest
from jwt.algorithms import HMACAlgorithm
from rest_framework.exceptions import APIException
from rest_framework.request import Request
from rest_framework.test import APIClient, APIRequestFactory
from rest_framework_simplejwt import authentication
from rest_framework_simplejwt.settings import api_settings as jwt_settings
from rest_framework_simplejwt.tokens import AccessToken

from mcp_platform.tokens import JWTAuthentication
from tests.conftest import record_compiled_sql

PEM_SECRET = (
    "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----"
)


@pytest.fixture
def der_checks(monkeypatch) -> list[bytes]:
    """The secrets PyJWT checks for being an asymmetric key, one entry per check."""
    checked = []
    stock = HMACAlgorithm._is_der_key

    def counting(key_bytes: bytes) -> bool:
        checked.append(key_bytes)
        return stock(key_bytes)

    monkeypatch.setattr(HMACAlgorithm, "_is_der_key", staticmethod(counting))
    return checked


@pytest.mark.parametrize("algorithm", ["HS256", "HS384", "HS512"])
def test_a_secret_is_checked_once_however_many_tokens_it_signs_and_verifies(algorithm, der_checks):
    secret = secrets.token_urlsafe(48)
    for number in range(3):
        token = jwt.encode({"number": number}, secret, algorithm=algorithm)
        assert jwt.decode(token, secret, algorithms=[algorithm]) == {"number": number}
    assert der_checks == [secret.encode()]


def test_a_token_signed_with_another_secret_is_still_refused():
    secret = secrets.token_urlsafe(48)
    token = jwt.encode({"sub": "1"}, secrets.token_urlsafe(48), algorithm="HS256")
    jwt.decode(jwt.encode({"sub": "1"}, secret, algorithm="HS256"), secret, algorithms=["HS256"])
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, secret, algorithms=["HS256"])


def test_an_asymmetric_key_given_as_a_secret_is_refused_every_time():
    token = jwt.encode({"sub": "1"}, secrets.token_urlsafe(48), algorithm="HS256")
    for _ in range(2):
        with pytest.raises(jwt.InvalidKeyError):
            jwt.decode(token, PEM_SECRET, algorithms=["HS256"])


@pytest.mark.django_db
def test_the_apis_tokens_are_signed_and_verified_with_the_secret_checked_before(user, der_checks):
    AccessToken(str(AccessToken.for_user(user)))
    der_checks.clear()  # the secret's first check, if no earlier test made it
    for _ in range(3):
        AccessToken(str(AccessToken.for_user(user)))
    assert der_checks == []


@pytest.mark.django_db
@pytest.mark.parametrize(
    "case",
    [
        "valid",
        "deleted",
        "inactive",
        "password_changed",
        "no_user_claim",
        "claim_as_text",
        "claim_out_of_range",
    ],
)
def test_the_apis_token_authentication_answers_as_simplejwts_does(user, case, monkeypatch):
    """The project's reads the user with SQL compiled once; what it accepts and refuses,
    and with which codes, is simplejwt's."""
    token = AccessToken.for_user(user)
    if case == "no_user_claim":
        del token[jwt_settings.USER_ID_CLAIM]
    elif case == "claim_as_text":
        token[jwt_settings.USER_ID_CLAIM] = str(user.pk)
    elif case == "claim_out_of_range":
        token[jwt_settings.USER_ID_CLAIM] = 2**63
    elif case == "deleted":
        user.delete()
    elif case == "inactive":
        user.is_active = False
        user.save()
    elif case == "password_changed":
        user.set_password("another-secret-9")
        user.save()
    request = APIRequestFactory().get("/", HTTP_AUTHORIZATION=f"Bearer {token}")

    def outcome(authentication: type) -> tuple:
        try:
            found, _ = authentication().authenticate(Request(request))
        except APIException as exc:
            return type(exc), exc.detail, exc.get_codes()
        return "accepted", found.pk, found.password

    ours = outcome(JWTAuthentication)
    assert ours == outcome(authentication.JWTAuthentication)
    compiled = record_compiled_sql(monkeypatch)
    assert outcome(JWTAuthentication) == ours  # with the user's read compiled
    assert compiled == []
    assert (ours[0] == "accepted") == (case in ("valid", "claim_as_text"))
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    response = api.get("/api/tasks/")
    if ours[0] == "accepted":
        assert response.status_code == 200
    else:
        assert response.status_code == 401
        assert (
            response.json()["code"]
            == {
                "deleted": "user_not_found",
                "claim_out_of_range": "user_not_found",
                "inactive": "user_inactive",
                "password_changed": "password_changed",
                "no_user_claim": "token_not_valid",
            }[case]
        )
