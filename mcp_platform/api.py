"""One shape for every API error: ``{"code": <stable code>, "detail": <text>}``.

Validation errors add ``errors``, the per-field details with their codes' messages.
"""

from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, HttpRequest, JsonResponse
from rest_framework import exceptions
from rest_framework.fields import get_error_detail
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import exception_handler as drf_exception_handler

from realtime.protocol import body_too_large
from realtime.views import PayloadTooLarge


def _first_code(codes: Any) -> str:
    while isinstance(codes, dict | list):
        if not codes:
            return "invalid"
        codes = next(iter(codes.values())) if isinstance(codes, dict) else codes[0]
    return str(codes)


def as_api_validation_error(exc: DjangoValidationError) -> exceptions.ValidationError:
    """A model or service ``ValidationError`` as DRF's, keeping its codes. One that names
    no field has its messages under ``non_field_errors``, as a serializer's would: ``errors``
    is always an object."""
    detail = get_error_detail(exc)
    if not isinstance(detail, dict):
        detail = {api_settings.NON_FIELD_ERRORS_KEY: detail}
    return exceptions.ValidationError(detail=detail)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, DjangoValidationError):
        exc = as_api_validation_error(exc)
    elif isinstance(exc, RequestDataTooBig):
        # Django's 400 (and an ERROR log line) for a body over its memory limit.
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        exc = PayloadTooLarge(body_too_large(limit))
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    response = drf_exception_handler(exc, context)
    if response is None or not isinstance(exc, exceptions.APIException):
        return response
    detail = exc.detail
    if isinstance(exc, exceptions.ValidationError):
        body = {"code": _first_code(exc.get_codes()), "detail": "Invalid input.", "errors": detail}
    elif isinstance(detail, dict):
        # simplejwt's token errors carry their own code and messages.
        body = {
            "code": str(detail.get("code", exc.default_code)),
            "detail": str(detail.get("detail", exc.default_detail)),
        }
    else:
        body = {"code": _first_code(exc.get_codes()), "detail": str(detail)}
    response.data = body
    return response


def bad_request(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return JsonResponse({"code": "bad_request", "detail": "Bad request."}, status=400)


def permission_denied(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return JsonResponse({"code": "permission_denied", "detail": "Permission denied."}, status=403)


def not_found(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return JsonResponse({"code": "not_found", "detail": "Not found."}, status=404)


def server_error(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"code": "server_error", "detail": "Internal server error."}, status=500)
