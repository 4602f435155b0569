"""PyJWT checks an HMAC secret once per process, and refuses the same secrets as before."""

import secrets

import jwt
import pytest
from jwt.algorithms import HMACAlgorithm
from rest_framework_simplejwt.tokens import AccessToken

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
