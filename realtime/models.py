"""The real-time app's records: sent broadcasts, and the admin's live connections entry."""

from django.conf import settings
from django.db import models


class Broadcast(models.Model):
    """One broadcast as sent, from any entry point, with the connections it reached."""

    #: ``None`` when sent from the command line (or when the sender was deleted).
    sent_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    payload = models.JSONField()
    recipients = models.PositiveIntegerField()
    websocket = models.PositiveIntegerField()
    sse = models.PositiveIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-pk"]
        # A record is history: it is never changed or deleted, and "sending" is not "adding".
        default_permissions = ("view",)
        permissions = [("send_broadcast", "Can send a broadcast")]

    def __str__(self) -> str:
        return str(self.payload.get("message", ""))[:80]

    @property
    def counts(self) -> dict[str, int]:
        """The connections reached, as ``POST /broadcast`` answers them."""
        return {"recipients": self.recipients, "websocket": self.websocket, "sse": self.sse}

    def describe_reach(self) -> str:
        return f"{self.recipients} connection(s): {self.websocket} WebSocket, {self.sse} SSE"


class LiveConnections(models.Model):
    """No table: it gives the admin's read-only "Live connections" page its place in the
    admin index. The counts come from the connection registry."""

    class Meta:
        managed = False
        default_permissions = ()
        verbose_name = verbose_name_plural = "live connections"
