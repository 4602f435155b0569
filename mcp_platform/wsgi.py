"""WSGI entry point, for the REST API and admin only; real-time endpoints need ASGI."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mcp_platform.settings")
application = get_wsgi_application()
