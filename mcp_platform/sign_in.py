"""Signing in for a token pair (``POST /api/token/``), throttled by client address.

Apart from ``mcp_platform.tokens``: simplejwt's views import DRF's settings, which import
that module's authentication class."""

from django.conf import settings
from rest_framework.request import Request
from rest_framework.throttling import SimpleRateThrottle
from rest_framework.views import APIView
from rest_framework_simplejwt import views


class SignInThrottle(SimpleRateThrottle):
    """``SIGN_INS_PER_MINUTE`` sign-ins for each client address (429 ``throttled``, with
    ``Retry-After``), counted in Django's cache: each process's own unless ``CACHES``
    says otherwise. Read when asked, not at import as DRF's scoped rates are."""

    scope = "sign_in"

    def get_rate(self) -> str:
        return f"{settings.SIGN_INS_PER_MINUTE}/minute"

    def get_cache_key(self, request: Request, view: APIView) -> str:
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}


class TokenObtainPairView(views.TokenObtainPairView):
    """simplejwt's sign-in, throttled: unthrottled, a burst of 60 wrong guesses kept every
    other REST and admin request waiting ~19 s for the two request threads."""

    throttle_classes = (SignInThrottle,)
