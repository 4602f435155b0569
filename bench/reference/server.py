"""What a hand-written server achieves: the yardstick every project figure is divided by.

It speaks the subset of the protocol that the benchmark drives, on the same URLs and with
the same message shapes, so the load client cannot tell the servers apart:

- ``GET /ws?token=…``: the JWT is validated (HS256 signature, expiry, ``token_type`` access,
  a known user); then ``connected``, and ``subscribe``/``unsubscribe``/``ping``.
- ``POST /api/tasks/`` and ``PATCH /api/tasks/{id}/`` (``Authorization: Bearer``): a change
  is encoded once and written to every subscribed socket and stream in a plain loop.
- ``POST /broadcast``: the same loop over every connection; answers ``recipients``.
- ``GET /events?task_id=…``: an event stream of the task's updates.

State lives in dicts of this one process; there is no database and no channel layer.
"""

import argparse
import asyncio
import json
import os
import uuid
from datetime import UTC, datetime
from typing import Any

import jwt
from aiohttp import WSMsgType, web

#: As the project's default; ``bench.instructions`` keeps heartbeats out of its windows.
HEARTBEAT_SECONDS = float(os.environ.get("BENCH_HEARTBEAT_SECONDS", "15"))


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def encode(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


def sse_event(event: str, data: str, event_id: str | None = None) -> bytes:
    head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id else "")
    return f"{head}data: {data}\n\n".encode()


def error(status: int, code: str, detail: str) -> web.Response:
    return web.json_response({"code": code, "detail": detail}, status=status)


class Reference:
    """The server's whole state: users, tasks, and who listens to what."""

    def __init__(self, secret: str, users: dict[int, bool]) -> None:
        self.secret = secret
        self.users = users  # user id -> is staff
        self.tasks: dict[str, dict[str, Any]] = {}
        self.sockets: set[web.WebSocketResponse] = set()
        self.streams: set[web.StreamResponse] = set()
        self.task_sockets: dict[str, set[web.WebSocketResponse]] = {}
        self.task_streams: dict[str, set[web.StreamResponse]] = {}

    # Authentication, as the project does it: signature, expiry, type, known user.

    def user_for(self, token: str | None) -> int | None:
        if not token:
            return None
        try:
            claims = jwt.decode(token, self.secret, algorithms=["HS256"])
            user_id = int(claims["user_id"])
        except (jwt.PyJWTError, KeyError, ValueError):
            return None
        if claims.get("token_type") != "access" or user_id not in self.users:
            return None
        return user_id

    def bearer_user(self, request: web.Request) -> int | None:
        header = request.headers.get("Authorization", "")
        token = header[7:] if header.startswith("Bearer ") else request.query.get("token")
        return self.user_for(token)

    def visible_task(self, user_id: int, task_id: Any) -> dict[str, Any] | None:
        task = self.tasks.get(task_id) if isinstance(task_id, str) else None
        if task is None or (task["owner"] != user_id and not self.users[user_id]):
            return None
        return task

    # Sending: encode once, then a plain loop.

    async def fan_out(
        self,
        text: str,
        sockets: set[web.WebSocketResponse],
        streams: set[web.StreamResponse],
        frame: bytes,
    ) -> None:
        for ws in list(sockets):
            if not ws.closed:
                try:
                    await ws.send_str(text)
                except ConnectionError:
                    sockets.discard(ws)
        for stream in list(streams):
            try:
                await stream.write(frame)
            except (ConnectionError, RuntimeError):
                streams.discard(stream)

    # HTTP handlers

    async def create_task(self, request: web.Request) -> web.Response:
        user_id = self.bearer_user(request)
        if user_id is None:
            return error(401, "not_authenticated", "Authentication credentials were not provided.")
        body = await request.json()
        stamp = now_iso()
        task = {
            "id": str(uuid.uuid4()),
            "owner": user_id,
            "name": str(body.get("name", "")),
            "status": "pending",
            "progress": 0,
            "result": None,
            "error": "",
            "seq": 1,
            "created_at": stamp,
            "updated_at": stamp,
        }
        self.tasks[task["id"]] = task
        return web.json_response(task, status=201)

    async def update_task(self, request: web.Request) -> web.Response:
        user_id = self.bearer_user(request)
        if user_id is None:
            return error(401, "not_authenticated", "Authentication credentials were not provided.")
        task = self.visible_task(user_id, request.match_info["task_id"])
        if task is None:
            return error(404, "not_found", "Not found.")
        body = await request.json()
        for field in ("status", "progress", "name", "result", "error"):
            if field in body:
                task[field] = body[field]
        task["seq"] += 1
        task["updated_at"] = now_iso()
        update = {
            "type": "task_update",
            "task_id": task["id"],
            "status": task["status"],
            "progress": task["progress"],
            "seq": task["seq"],
            "timestamp": now_iso(),
            "task": task,
        }
        text = encode(update)
        frame = sse_event("task_update", text, f"{task['id']}:{task['seq']}")
        await self.fan_out(
            text,
            self.task_sockets.get(task["id"], set()),
            self.task_streams.get(task["id"], set()),
            frame,
        )
        return web.json_response(task)

    async def broadcast(self, request: web.Request) -> web.Response:
        user_id = self.bearer_user(request)
        if user_id is None:
            return error(401, "not_authenticated", "Authentication credentials were not provided.")
        if not self.users[user_id]:
            return error(403, "permission_denied", "Only staff may broadcast.")
        payload = await request.json()
        if not isinstance(payload, dict) or not isinstance(payload.get("message"), str):
            return error(400, "invalid", "A message is required.")
        payload.setdefault("type", "announcement")
        text = encode({"type": "broadcast", "payload": payload, "timestamp": now_iso()})
        counts = {"websocket": len(self.sockets), "sse": len(self.streams)}
        await self.fan_out(
            text, self.sockets, self.streams, sse_event("broadcast", encode(payload))
        )
        return web.json_response({"recipients": sum(counts.values()), **counts})

    async def events(self, request: web.Request) -> web.StreamResponse:
        user_id = self.bearer_user(request)
        if user_id is None:
            return error(401, "not_authenticated", "Authentication credentials were not provided.")
        task_ids = request.query.getall("task_id", [])
        if not task_ids or any(self.visible_task(user_id, t) is None for t in task_ids):
            return error(404, "not_found", "Not found.")
        stream = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await stream.prepare(request)
        connected = encode({"connection_id": str(uuid.uuid4()), "user_id": user_id})
        await stream.write(b"retry: 3000\n\n" + sse_event("connected", connected))
        self.streams.add(stream)
        for task_id in task_ids:
            self.task_streams.setdefault(task_id, set()).add(stream)
        try:
            while True:  # ends when the client goes away (handler cancellation)
                await asyncio.sleep(HEARTBEAT_SECONDS)
                await stream.write(sse_event("heartbeat", encode({"timestamp": now_iso()})))
        except (ConnectionError, RuntimeError):
            pass
        finally:
            self.streams.discard(stream)
            for task_id in task_ids:
                self.task_streams.get(task_id, set()).discard(stream)
        return stream

    # WebSocket

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=65536)
        await ws.prepare(request)
        user_id = self.user_for(request.query.get("token"))
        if user_id is None:
            await ws.close(code=4401)
            return ws
        self.sockets.add(ws)
        subscribed: set[str] = set()
        try:
            await ws.send_str(
                encode(
                    {"type": "connected", "connection_id": str(uuid.uuid4()), "user_id": user_id}
                )
            )
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    await ws.send_str(encode(self.reply(ws, user_id, subscribed, message.data)))
        finally:
            self.sockets.discard(ws)
            for task_id in subscribed:
                self.task_sockets[task_id].discard(ws)
        return ws

    def reply(
        self, ws: web.WebSocketResponse, user_id: int, subscribed: set[str], text: str
    ) -> dict[str, Any]:
        try:
            message = json.loads(text)
            action, task_id = message.get("action"), message.get("task_id")
        except (ValueError, AttributeError):
            return {"type": "error", "code": "invalid_json", "message": "Not a JSON object."}
        if action == "ping":
            return {"type": "pong", "timestamp": now_iso()}
        if action not in ("subscribe", "unsubscribe"):
            return {"type": "error", "code": "unknown_action", "message": "Unknown action."}
        if action == "unsubscribe":
            subscribed.discard(task_id)
            self.task_sockets.get(task_id, set()).discard(ws)
            return {"type": "unsubscribed", "task_id": task_id}
        task = self.visible_task(user_id, task_id)
        if task is None:
            return {"type": "error", "code": "not_found", "message": "No such task."}
        subscribed.add(task_id)
        self.task_sockets.setdefault(task_id, set()).add(ws)
        return {"type": "subscribed", "task_id": task_id, "seq": task["seq"], "task": task}

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes(
            [
                web.get("/ws", self.websocket),
                web.get("/ws/", self.websocket),
                web.post("/api/tasks/", self.create_task),
                web.patch("/api/tasks/{task_id}/", self.update_task),
                web.post("/broadcast", self.broadcast),
                web.get("/events", self.events),
            ]
        )
        return app


async def serve(port: int, reference: Reference) -> None:
    # Handler cancellation ends an event stream's handler when its client goes away.
    runner = web.AppRunner(reference.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # The signing key and the users come from the environment, as the project's do.
    users = {int(k): bool(v) for k, v in json.loads(os.environ["BENCH_USERS"]).items()}
    try:
        asyncio.run(serve(args.port, Reference(os.environ["BENCH_SECRET"], users)))
    except KeyboardInterrupt:
        pass
