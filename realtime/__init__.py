"""Live task updates and broadcasts over WebSocket and Server-Sent Events."""
