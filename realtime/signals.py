"""Tells a user's live connections when their access changes, whichever code path changed it.

A connection checks its credentials when they are given, when its token expires, and every
``SESSION_RECHECK_SECONDS`` for a session. Without this, a user deactivated, deleted or
no longer staff in the admin kept their streams, and what they showed, until then: up to
the token's lifetime. Saved changes are read against the stored row. ``QuerySet.update()``
sends no signals, and fixtures (``loaddata``) are saved raw, unread: a change made either
way waits for those checks.
"""

from typing import Any

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.db.models.signals import post_delete, post_save, pre_save
from django.dispatch import receiver

from realtime.api import publish_access_change, publish_after_commit

#: The user's fields that decide whether their connections' credentials hold
#: (``InboxConsumerMixin.credentials_hold()``), where the user model has them.
ACCESS_FIELDS = ("is_active", "is_staff", "password")

#: Where ``pre_save`` leaves the stored values of the access fields for ``post_save``.
STORED = "_realtime_stored_access"


def access_fields(model: type[AbstractBaseUser], update_fields: Any) -> list[str]:
    """The access fields a save of ``update_fields`` (``None``: all) may change."""
    names = {field.name for field in model._meta.concrete_fields}
    return [
        name
        for name in ACCESS_FIELDS
        if name in names and (update_fields is None or name in update_fields)
    ]


@receiver(pre_save, sender=settings.AUTH_USER_MODEL, dispatch_uid="realtime.read_access")
def read_access(
    sender: type[AbstractBaseUser], instance: AbstractBaseUser, raw: bool, using: str, **kwargs: Any
) -> None:
    """Read the access fields as stored, before the save replaces them. A new user has no
    row (or no pk yet) and no connections; a login's save of ``last_login`` alone costs no
    read. What a save that failed left is dropped first."""
    instance.__dict__.pop(STORED, None)
    fields = access_fields(sender, kwargs.get("update_fields"))
    if raw or instance.pk is None or not fields:
        return
    stored = sender._base_manager.using(using).filter(pk=instance.pk).values(*fields).first()
    instance.__dict__[STORED] = stored


@receiver(post_save, sender=settings.AUTH_USER_MODEL, dispatch_uid="realtime.access_saved")
def access_saved(
    sender: type[AbstractBaseUser], instance: AbstractBaseUser, using: str, **kwargs: Any
) -> None:
    stored = instance.__dict__.pop(STORED, None)
    if stored and any(getattr(instance, name) != value for name, value in stored.items()):
        user_id = instance.pk
        publish_after_commit(using, f"user {user_id}", publish_access_change, user_id)


@receiver(post_delete, sender=settings.AUTH_USER_MODEL, dispatch_uid="realtime.access_deleted")
def access_deleted(
    sender: type[AbstractBaseUser], instance: AbstractBaseUser, using: str, **kwargs: Any
) -> None:
    user_id = instance.pk
    publish_after_commit(using, f"user {user_id}", publish_access_change, user_id)
