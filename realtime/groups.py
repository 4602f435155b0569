"""Channel-layer group names; no group name is built anywhere else.

Names must match ``^[a-zA-Z0-9\\-_.]+$`` and stay under 100 characters (Channels' rule).
"""

import uuid

#: Every live connection, WebSocket and SSE, for system-wide broadcasts.
BROADCAST_GROUP = "broadcast"

#: SSE streams of staff users that follow every task.
STAFF_FEED_GROUP = "feed.staff"


def task_group(task_id: uuid.UUID) -> str:
    """Subscribers of one task."""
    return f"task.{task_id}"


def user_group(user_id: int) -> str:
    """Every connection of one user, for personal messages and access changes."""
    return f"user.{user_id}"


def feed_group(user_id: int) -> str:
    """SSE streams that follow every task one user owns."""
    return f"feed.user.{user_id}"
