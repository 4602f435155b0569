"""Settings for the MCP Platform.

Every value that differs between machines comes from the environment, read here and nowhere else.
The defaults run a single development process: SQLite and an in-process channel layer.
"""

from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from mcp_platform.env import env_bool, env_choice, env_int, env_list, env_prefixed, env_str

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DJANGO_DEBUG", False)
#: The shortest secret that signs in production. The keys sign JWTs with HS256, whose key
#: RFC 7518 wants of 256 bits at least: a 3-character key was found from one token in
#: 0.0 s, and a superuser's token signed with it.
MIN_SECRET_LENGTH = 32
SECRET_KEY = env_str("DJANGO_SECRET_KEY")
if not SECRET_KEY.strip():  # blanks sign sessions and tokens that anyone can forge
    if not DEBUG:
        raise ImproperlyConfigured("DJANGO_SECRET_KEY must be set when DJANGO_DEBUG is off.")
    SECRET_KEY = "insecure-development-key-only-used-with-debug-on"

ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
# Served over HTTPS in production (TLS at the server, or at a proxy that says so in
# X-Forwarded-Proto to a server run with --proxy-headers): the session and CSRF cookies
# are not sent over plain http, where anyone on the way could read an admin's session.
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env_bool("DJANGO_SECURE_COOKIES", not DEBUG)
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", False)
# Off unless asked for: once a browser has seen it, the site is https-only to it for as long.
SECURE_HSTS_SECONDS = env_int("DJANGO_SECURE_HSTS_SECONDS", 0, minimum=0)
# Origins other than the server's own that may post forms and open WebSockets with a
# session (https://app.example.com, https://*.example.com).
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_prometheus",
    "rest_framework",
    "channels",
    "realtime",
    "mcp_platform.tasks",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "mcp_platform.urls"
WSGI_APPLICATION = "mcp_platform.wsgi.application"
ASGI_APPLICATION = "mcp_platform.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASE_URL = env_str("DATABASE_URL").strip() or f"sqlite:///{BASE_DIR / 'db.sqlite3'}"
try:
    DATABASES = {
        "default": dj_database_url.parse(
            DATABASE_URL,
            # Each request thread (REQUEST_THREADS) keeps its connection, checked before reuse.
            conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60, minimum=0),
            conn_health_checks=env_bool("DATABASE_CONN_HEALTH_CHECKS", True),
        )
    }
except ValueError as exc:
    raise ImproperlyConfigured(f"DATABASE_URL is not a database URL: {exc}") from None
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # libpq waits without end for a server that never answers (one behind a firewall that
    # drops packets): each request's thread waited for the kernel's ~2 minutes of TCP
    # retries, the REST API with them, and the server's start in its migrations check.
    # The URL's ``?connect_timeout=`` sets another.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("connect_timeout", 10)
# Threads that serve Django's requests (mcp_platform.handlers); each holds a connection.
REQUEST_THREADS = env_int("DJANGO_REQUEST_THREADS", 2, minimum=1)
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Tests run a real server in another process, which cannot see an in-memory database.
    DATABASES["default"]["TEST"] = {"NAME": str(BASE_DIR / "test_db.sqlite3")}
    # Requests run in threads of their own, so writers overlap: each transaction takes
    # the write lock when it begins (not midway, which fails with "database is locked"),
    # and WAL lets readers go on meanwhile and makes a commit one sync, not several.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        timeout=20,
        transaction_mode="IMMEDIATE",
        init_command="PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    )

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

# Every REALTIME_* variable overrides the setting of the same name; realtime.conf
# coerces each to its default's type and the system checks reject unknown names.
REALTIME = {
    "TASK_SOURCE": "mcp_platform.tasks.realtime.TaskSource",
    "REDIS_URL": env_str("REDIS_URL"),
    # Names in Redis start with this, so deployments sharing one Redis stay apart.
    "REDIS_PREFIX": env_str("REDIS_PREFIX", "mcp"),
    **env_prefixed("REALTIME_"),
}
# The channel layer uses the registry's Redis and prefix, whichever variable named them:
# set apart by REALTIME_REDIS_PREFIX, deployments kept their registries apart and shared
# their channels, each one's broadcasts reaching the other's clients.
REDIS_URL = REALTIME["REDIS_URL"] = REALTIME["REDIS_URL"].strip()
REDIS_PREFIX = REALTIME["REDIS_PREFIX"]
if REDIS_URL:
    # The pub/sub layer sends a group message to Redis once and fans it out in each
    # process; the core layer copies it per channel and drops it when a channel is full.
    # realtime.redis_layer adapts channels-redis's pub/sub layer to the inbox.
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "realtime.redis_layer.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "prefix": f"{REDIS_PREFIX}:layer:"},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "realtime.layers.InMemoryChannelLayer"}}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "mcp_platform.tokens.JWTAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["realtime.parsers.JSONParser"],
    "EXCEPTION_HANDLER": "mcp_platform.api.exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    # A client's address is the connection's (Daphne's from a proxy's header with
    # --proxy-headers), never a header any client may send: throttles count by it.
    "NUM_PROXIES": 0,
}

# Ten years. Much longer is no expiry at all, and a token whose expiry would fall after the
# year 9999 cannot be issued: every request for one failed with a 500.
MAX_TOKEN_LIFETIME_SECONDS = 10 * 365 * 24 * 3600
JWT_SIGNING_KEY = env_str("JWT_SIGNING_KEY")
for _name, _key in (("DJANGO_SECRET_KEY", SECRET_KEY), ("JWT_SIGNING_KEY", JWT_SIGNING_KEY)):
    if not DEBUG and _key.strip() and len(_key) < MIN_SECRET_LENGTH:
        raise ImproperlyConfigured(
            f"{_name} must be at least {MIN_SECRET_LENGTH} characters when DJANGO_DEBUG is off."
        )
SIMPLE_JWT = {
    "ACCESS_TOKEN_LIFETIME": timedelta(
        seconds=env_int(
            "JWT_ACCESS_LIFETIME_SECONDS", 300, minimum=1, maximum=MAX_TOKEN_LIFETIME_SECONDS
        )
    ),
    "REFRESH_TOKEN_LIFETIME": timedelta(
        seconds=env_int(
            "JWT_REFRESH_LIFETIME_SECONDS", 86400, minimum=1, maximum=MAX_TOKEN_LIFETIME_SECONDS
        )
    ),
    "SIGNING_KEY": JWT_SIGNING_KEY if JWT_SIGNING_KEY.strip() else SECRET_KEY,
    "ALGORITHM": "HS256",
    "UPDATE_LAST_LOGIN": False,
    # A token carries a hash of its user's password hash, so a new password revokes every
    # token issued before it: after a reset for a stolen password, a stolen refresh token
    # minted working access tokens for the rest of its day.
    "CHECK_REVOKE_TOKEN": True,
    "TOKEN_REFRESH_SERIALIZER": "mcp_platform.tokens.TokenRefreshSerializer",
}
# Sign-ins (POST /api/token/) each client address may make a minute, per server process:
# each costs a password hash (~0.3 s of a request thread), so a flood of guesses made every
# other request wait (mcp_platform.sign_in.SignInThrottle).
SIGN_INS_PER_MINUTE = env_int("JWT_SIGN_INS_PER_MINUTE", 30, minimum=1)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {
            "()": "realtime.redaction.RedactingFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s: %(message)s",
        }
    },
    "filters": {"client_fault": {"()": "mcp_platform.logs.ClientFault"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_choice("DJANGO_LOG_LEVEL", "INFO", LOG_LEVELS)},
    "loggers": {
        # Django's own handlers for it (its console one under DEBUG) wrote every line of
        # django.* a second time, beside the root's; it now has the root's level.
        "django": {"handlers": [], "level": "NOTSET"},
        # Not the SQL of every query (under DEBUG), parameters, password hashes and all;
        # nor each template variable not found, with the page's context (its CSRF token).
        "django.db.backends": {"level": "INFO"},
        "django.template": {"level": "INFO"},
        "django.channels.server": {"level": "WARNING"},
        "django.security.DisallowedHost": {"filters": ["client_fault"]},
    },
}
