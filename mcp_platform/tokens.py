"""The project's JWT endpoints' parts that differ from simplejwt's."""

from typing import Any

from django.contrib.auth import get_user_model
from rest_framework.exceptions import AuthenticationFailed
from rest_framework_simplejwt import serializers


class TokenRefreshSerializer(serializers.TokenRefreshSerializer):
    """simplejwt's, except that a refresh token whose user was deleted is a 401, not a 500:
    simplejwt (5.5.1) looks the user up and lets ``DoesNotExist`` through."""

    def validate(self, attrs: dict[str, Any]) -> dict[str, str]:
        try:
            return super().validate(attrs)
        except get_user_model().DoesNotExist:
            raise AuthenticationFailed(
                self.error_messages["no_active_account"], "no_active_account"
            ) from None
