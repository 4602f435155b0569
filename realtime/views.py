"""``POST /broadcast``: the REST entry point to ``realtime.broadcasts``."""

from typing import Any

from django.core.exceptions import RequestDataTooBig
from rest_framework import exceptions, status
from rest_framework.permissions import BasePermission, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from realtime import broadcasts
from realtime.conf import realtime_settings
from realtime.parsers import JSONParser
from realtime.protocol import HttpErrorCode, body_too_large


class PayloadTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "The request body is too large."
    default_code = HttpErrorCode.PAYLOAD_TOO_LARGE


class LayerUnavailable(exceptions.APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = (
        "The channel layer or the connection registry could not be reached; the broadcast "
        "was not recorded."
    )
    default_code = "service_unavailable"


class CanSendBroadcast(BasePermission):
    message = "Only staff and holders of realtime.send_broadcast may send broadcasts."

    def has_permission(self, request: Request, view: APIView) -> bool:
        return broadcasts.can_send(request.user)


def body_exceeds(request: Request, limit: int) -> bool:
    """Whether the body is over ``limit`` bytes, judged by ``Content-Length`` before it is
    read, then by the bytes themselves (a client may send none or a wrong one)."""
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    if declared > limit:
        return True
    try:
        return len(request.body) > limit
    except RequestDataTooBig:  # over Django's own limit, which is larger
        return True


class BroadcastView(APIView):
    """Send a broadcast to every live connection; answers how many were reached."""

    permission_classes = [IsAuthenticated, CanSendBroadcast]
    parser_classes = [JSONParser]
    http_method_names = ["post"]  # DRF would also answer OPTIONS with its metadata

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        # Anything but POST is 405 whoever sends it, as documented; DRF would answer 401 or
        # 403 first, and only staff would learn that the method was wrong.
        if request.method.lower() not in self.http_method_names:
            raise exceptions.MethodNotAllowed(request.method)
        super().initial(request, *args, **kwargs)

    def post(self, request: Request) -> Response:
        limit = realtime_settings.BROADCAST_MAX_BYTES
        if body_exceeds(request, limit):
            raise PayloadTooLarge(body_too_large(limit))
        try:
            broadcast = broadcasts.send(payload=request.data, sent_by=request.user)
        except broadcasts.BroadcastUnavailable:
            raise LayerUnavailable() from None
        return Response(broadcast.counts)
