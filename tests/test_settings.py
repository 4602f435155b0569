"""Settings come from the environment, with safe defaults (each case in a fresh process)."""

import json
import math
import os
import subprocess
import sys

import pytest
from django.core.checks import run_checks

from realtime import checks
from realtime.sources import TaskSource
from tests.conftest import ROOT, free_port

BASE_ENV = {"PATH": os.environ.get("PATH", ""), "DJANGO_SETTINGS_MODULE": "mcp_platform.settings"}


def settings_of(env: dict[str, str], expression: str) -> subprocess.CompletedProcess:
    code = (
        "import django, json; django.setup(); from django.conf import settings; "
        f"from realtime.conf import realtime_settings; print(json.dumps({expression}, default=str))"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**BASE_ENV, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def value_of(env: dict[str, str], expression: str):
    result = settings_of(env, expression)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("key", [None, "", "  \t"])
def test_refuses_to_start_with_debug_off_and_no_secret_key(key):
    """A blank one was taken, to sign sessions and tokens."""
    env = {"DJANGO_DEBUG": "0"} if key is None else {"DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": key}
    result = settings_of(env, "1")
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY must be set" in result.stderr


@pytest.mark.parametrize("name", ["DJANGO_SECRET_KEY", "JWT_SIGNING_KEY"])
def test_refuses_to_start_with_debug_off_and_a_short_key(name):
    """A 3-character key was found from one token at once, and a superuser's token
    signed with it."""
    env = {"DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": "s" * 40, name: "k" * 31}
    result = settings_of(env, "1")
    assert result.returncode != 0
    assert f"{name} must be at least 32 characters" in result.stderr
    assert settings_of({**env, name: "k" * 32}, "1").returncode == 0
    assert settings_of({**env, "DJANGO_DEBUG": "1"}, "1").returncode == 0  # development


def test_production_cookies_are_secure_and_https_is_asked_for_only_when_said():
    production = {"DJANGO_SECRET_KEY": "s" * 40}
    names = "[settings.SESSION_COOKIE_SECURE, settings.CSRF_COOKIE_SECURE, "
    names += "settings.SECURE_SSL_REDIRECT, settings.SECURE_HSTS_SECONDS]"
    assert value_of(production, names) == [True, True, False, 0]
    assert value_of({**production, "DJANGO_DEBUG": "1"}, names) == [False, False, False, 0]
    said = {"DJANGO_SECURE_SSL_REDIRECT": "1", "DJANGO_SECURE_HSTS_SECONDS": "31536000"}
    assert value_of({**production, **said}, names) == [True, True, True, 31536000]
    plain_http = {**production, "DJANGO_SECURE_COOKIES": "0"}
    assert value_of(plain_http, names) == [False, False, False, 0]


def test_debug_is_off_by_default():
    assert value_of({"DJANGO_SECRET_KEY": "k" * 40}, "settings.DEBUG") is False


def test_jwt_signing_key_defaults_to_the_secret_key_and_can_be_set():
    env = {"DJANGO_SECRET_KEY": "s" * 40}
    assert value_of(env, "settings.SIMPLE_JWT['SIGNING_KEY']") == "s" * 40
    env["JWT_SIGNING_KEY"] = " "  # blank: the secret key signs
    assert value_of(env, "settings.SIMPLE_JWT['SIGNING_KEY']") == "s" * 40
    env["JWT_SIGNING_KEY"] = "j" * 40
    assert value_of(env, "settings.SIMPLE_JWT['SIGNING_KEY']") == "j" * 40


def test_environment_drives_hosts_lifetimes_database_and_layer():
    env = {
        "DJANGO_DEBUG": "true",
        "DJANGO_ALLOWED_HOSTS": "a.example, b.example",
        "JWT_ACCESS_LIFETIME_SECONDS": "60",
        "JWT_REFRESH_LIFETIME_SECONDS": "120",
        "DATABASE_URL": "postgres://u:p@db.internal:5433/platform",
        "REDIS_URL": "redis://cache.internal:6380/0",
    }
    values = value_of(
        env,
        "[settings.ALLOWED_HOSTS, settings.SIMPLE_JWT['ACCESS_TOKEN_LIFETIME'].total_seconds(),"
        " settings.SIMPLE_JWT['REFRESH_TOKEN_LIFETIME'].total_seconds(),"
        " settings.DATABASES['default']['HOST'], settings.DATABASES['default']['NAME'],"
        " settings.CHANNEL_LAYERS['default']['BACKEND']]",
    )
    assert values == [
        ["a.example", "b.example"],
        60,
        120,
        "db.internal",
        "platform",
        "realtime.redis_layer.RedisPubSubChannelLayer",
    ]


@pytest.mark.parametrize(("query", "timeout"), [("", 10), ("?connect_timeout=3", 3)])
def test_a_postgresql_connection_attempt_has_a_timeout(query, timeout):
    env = {"DJANGO_DEBUG": "1", "DATABASE_URL": f"postgres://u@db.internal/platform{query}"}
    assert value_of(env, "settings.DATABASES['default']['OPTIONS']['connect_timeout']") == timeout


def test_embedded_defaults_are_sqlite_and_an_in_process_layer():
    values = value_of(
        {"DJANGO_DEBUG": "1"},
        "[settings.DATABASES['default']['ENGINE'], settings.CHANNEL_LAYERS['default']['BACKEND']]",
    )
    assert values[0] == "django.db.backends.sqlite3"
    assert "InMemoryChannelLayer" in values[1]


def test_realtime_settings_come_from_same_named_variables_with_their_types():
    env = {
        "DJANGO_DEBUG": "1",
        "REALTIME_SUBSCRIPTION_LIMIT": "7",
        "REALTIME_SSE_HEARTBEAT_SECONDS": "2.5",
    }
    assert value_of(
        env, "[realtime_settings.SUBSCRIPTION_LIMIT, realtime_settings.SSE_HEARTBEAT_SECONDS]"
    ) == [7, 2.5]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DJANGO_DEBUG": "maybe"}, "DJANGO_DEBUG must be a boolean"),
        ({"DJANGO_DEBUG": "1", "JWT_ACCESS_LIFETIME_SECONDS": "soon"}, "must be an integer"),
        (
            {"DJANGO_DEBUG": "1", "REALTIME_SUBSCRIPTION_LIMIT": "many"},
            "REALTIME_SUBSCRIPTION_LIMIT must be an integer",
        ),
        ({"DJANGO_DEBUG": "1", "DJANGO_LOG_LEVEL": "loud"}, "DJANGO_LOG_LEVEL must be one of"),
        ({"DJANGO_DEBUG": "1", "DJANGO_REQUEST_THREADS": "0"}, "must be at least 1, not 0"),
        ({"DJANGO_DEBUG": "1", "JWT_ACCESS_LIFETIME_SECONDS": "-5"}, "must be at least 1"),
        ({"DJANGO_DEBUG": "1", "DATABASE_CONN_MAX_AGE": "-1"}, "must be at least 0"),
        (
            {"DJANGO_DEBUG": "1", "JWT_REFRESH_LIFETIME_SECONDS": "300000000000"},
            "JWT_REFRESH_LIFETIME_SECONDS must be at most 315360000",
        ),
        ({"DJANGO_DEBUG": "1", "DATABASE_URL": "nonsense"}, "DATABASE_URL is not a database URL"),
    ],
)
def test_malformed_values_are_refused_with_the_variable_named(env, message):
    result = settings_of(env, "realtime_settings.SUBSCRIPTION_LIMIT")
    assert result.returncode != 0 and message in result.stderr


def test_an_empty_database_url_is_the_default():
    assert value_of({"DJANGO_DEBUG": "1", "DATABASE_URL": " "}, "settings.DATABASES['default']")[
        "NAME"
    ].endswith("db.sqlite3")


def test_an_empty_realtime_variable_is_the_default():
    """An environment file's blank REALTIME_ lines stopped start-up with a traceback."""
    env = {
        "DJANGO_DEBUG": "1",
        "REALTIME_SUBSCRIPTION_LIMIT": "",
        "REALTIME_SSE_HEARTBEAT_SECONDS": " ",
        "REALTIME_TASK_SOURCE": "",
    }
    expression = (
        "[realtime_settings.SUBSCRIPTION_LIMIT, realtime_settings.SSE_HEARTBEAT_SECONDS,"
        " realtime_settings.TASK_SOURCE]"
    )
    assert value_of(env, expression) == [100, 15.0, "mcp_platform.tasks.realtime.TaskSource"]


def test_a_redis_url_that_redis_py_reads_is_accepted_as_it_reads_it():
    env = {"DJANGO_DEBUG": "1", "REDIS_URL": " redis://127.0.0.1:6379/%38 "}
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--tag", "realtime"],
        env={**BASE_ENV, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert value_of(env, "realtime_settings.REDIS_URL") == "redis://127.0.0.1:6379/%38"


def test_every_empty_variable_is_its_default():
    """Not only some: an empty DJANGO_SECURE_COOKIES turned the Secure flag off, an empty
    DJANGO_ALLOWED_HOSTS refused every request, and an empty REDIS_PREFIX wrote keys
    under ':'."""
    empty = {
        name: " "
        for name in (
            "DJANGO_ALLOWED_HOSTS",
            "DJANGO_SECURE_COOKIES",
            "DJANGO_CSRF_TRUSTED_ORIGINS",
            "DATABASE_CONN_HEALTH_CHECKS",
            "REDIS_URL",
            "REDIS_PREFIX",
            "JWT_SIGNING_KEY",
        )
    }
    env = {**empty, "DJANGO_SECRET_KEY": "s" * 50}
    expression = (
        "[settings.ALLOWED_HOSTS, settings.SESSION_COOKIE_SECURE, settings.CSRF_COOKIE_SECURE,"
        " settings.CSRF_TRUSTED_ORIGINS, settings.DATABASES['default']['CONN_HEALTH_CHECKS'],"
        " realtime_settings.REDIS_URL, realtime_settings.REDIS_PREFIX,"
        " settings.SIMPLE_JWT['SIGNING_KEY'] == settings.SECRET_KEY]"
    )
    assert value_of(env, expression) == [
        ["localhost", "127.0.0.1", "[::1]"],
        True,
        True,
        [],
        True,
        "",
        "mcp",
        True,
    ]


def get_in_a_process(arguments: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Django's test client's ``get(arguments)`` in a fresh process of the project, which
    prints the answer's status; its log lines are the process's stderr."""
    code = (
        "import django; django.setup(); from django.test import Client; "
        f"print(Client().get({arguments}).status_code)"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        env={
            **BASE_ENV,
            "DJANGO_SECRET_KEY": "s" * 50,
            "DJANGO_ALLOWED_HOSTS": "testserver",
            **env,
        },
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize("debug", ["0", "1"])
def test_each_log_line_is_written_once(debug):
    result = get_in_a_process("'/no/such/path/'", {"DJANGO_DEBUG": debug})
    assert result.stderr.count("Not Found: /no/such/path/") == 1, result.stderr


@pytest.mark.parametrize("level", ["WARNING", "ERROR"])
def test_a_host_not_allowed_is_one_warning_line(level):
    """Django logs it as an error with a traceback of 14 lines; a scraper naming the server
    by its address wrote them on every scrape. As a warning, it is left out at ERROR."""
    result = get_in_a_process("'/metrics', HTTP_HOST='10.0.0.5:8000'", {"DJANGO_LOG_LEVEL": level})
    assert result.stdout == "400\n"
    if level == "ERROR":
        assert result.stderr == ""
        return
    [line] = result.stderr.splitlines()
    assert (
        " WARNING django.security.DisallowedHost: Invalid HTTP_HOST header: '10.0.0.5:8000'."
        in line
    )


def test_a_minimum_is_a_value_allowed():
    """No connection kept between requests (behind a pooler), HSTS off, one request thread."""
    env = {
        "DJANGO_DEBUG": "1",
        "DATABASE_CONN_MAX_AGE": "0",
        "DJANGO_SECURE_HSTS_SECONDS": "0",
        "DJANGO_REQUEST_THREADS": "1",
    }
    assert value_of(
        env,
        "[settings.DATABASES['default']['CONN_MAX_AGE'], settings.SECURE_HSTS_SECONDS,"
        " settings.REQUEST_THREADS]",
    ) == [0, 0, 1]


def test_a_log_level_may_be_given_in_any_case():
    env = {"DJANGO_DEBUG": "1", "DJANGO_LOG_LEVEL": "debug"}
    assert value_of(env, "settings.LOGGING['root']['level']") == "DEBUG"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REORDER_WINDOW_SECONDS", 0.0),
        ("REORDER_WINDOW_SECONDS", -1.0),
        ("REORDER_WINDOW_SECONDS", math.nan),
        ("SSE_HEARTBEAT_SECONDS", math.nan),
        ("CONNECTION_LEASE_SECONDS", math.inf),
        ("CONNECTION_LEASE_SECONDS", math.nan),
        ("SLOW_CLIENT_BUFFER_BYTES", -1),
        ("PUBLISH_WAIT_SECONDS", 0.0),
    ],
)
def test_counts_sizes_and_intervals_must_be_finite_and_positive(settings, name, value):
    settings.REALTIME = {**settings.REALTIME, name: value}
    [error] = [m for m in run_checks(tags=[checks.TAG]) if m.id == "realtime.E002"]
    assert error.msg.startswith(name)


@pytest.mark.parametrize(
    ("value", "refused"), [(0, False), (3, False), (-1, True), (2.5, True), (True, True)]
)
def test_the_connection_limit_is_a_whole_number_of_0_or_more(settings, value, refused):
    settings.REALTIME = {**settings.REALTIME, "MAX_CONNECTIONS_PER_USER": value}
    ids = [message.id for message in run_checks(tags=[checks.TAG])]
    assert ("realtime.E007" in ids) is refused


@pytest.mark.parametrize("prefix", ["", "REALTIME_"])
def test_either_name_of_the_redis_variables_sets_the_layer_and_the_registry_alike(prefix):
    """Set by ``REALTIME_REDIS_PREFIX``, the registry's prefix was apart from the layer's:
    deployments sharing one Redis kept their counts apart and shared their channels."""
    env = {
        "DJANGO_DEBUG": "1",
        f"{prefix}REDIS_URL": " redis://cache.internal:6380/2 ",
        f"{prefix}REDIS_PREFIX": "blue",
    }
    values = value_of(
        env,
        "[settings.CHANNEL_LAYERS['default']['CONFIG'], realtime_settings.REDIS_URL,"
        " realtime_settings.REDIS_PREFIX]",
    )
    assert values == [
        {"hosts": ["redis://cache.internal:6380/2"], "prefix": "blue:layer:"},
        "redis://cache.internal:6380/2",
        "blue",
    ]


@pytest.mark.parametrize("registry_in_redis", [True, False])
def test_a_registry_and_a_layer_not_both_in_redis_fail_the_checks(settings, registry_in_redis):
    """Apart, broadcasts count the clients of every process and reach those of one, or the
    other way round."""
    settings.REALTIME = {
        **settings.REALTIME,
        "REDIS_URL": "redis://127.0.0.1:6379/0" if registry_in_redis else "",
    }
    backend = (
        "layers.InMemoryChannelLayer"
        if registry_in_redis
        else "redis_layer.RedisPubSubChannelLayer"
    )
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": f"realtime.{backend}"}}
    assert "realtime.E004" in [message.id for message in run_checks(tags=[checks.TAG])]


class AnsweringManyAtOnce(TaskSource):
    def get_visible_many(self, requests):
        return [None for _ in requests]


def test_a_task_source_answering_only_many_at_once_passes_the_checks(settings):
    settings.REALTIME = {
        **settings.REALTIME,
        "TASK_SOURCE": f"{__name__}.{AnsweringManyAtOnce.__qualname__}",
    }
    assert "realtime.E005" not in [message.id for message in run_checks(tags=[checks.TAG])]


def test_a_project_that_names_no_task_source_fails_the_checks(settings):
    settings.REALTIME = {
        name: value for name, value in settings.REALTIME.items() if name != "TASK_SOURCE"
    }
    assert "realtime.E003" in [message.id for message in run_checks(tags=[checks.TAG])]


@pytest.mark.parametrize(
    ("variable", "value", "check"),
    [
        ("REALTIME_SUBSCRIPTON_LIMIT", "5", "realtime.E001"),
        ("REALTIME_CONNECTION_LEASE_SECONDS", "0", "realtime.E002"),
        ("REALTIME_SLOW_CLIENT_QUEUE_LIMIT", "-1", "realtime.E002"),
        ("REALTIME_MAX_CONNECTIONS_PER_USER", "-1", "realtime.E007"),
        ("REALTIME_TASK_SOURCE", "mcp_platform.tasks.realtime.TaskSourc", "realtime.E005"),
        ("REALTIME_TASK_SOURCE", "realtime.layers.ChannelQueue", "realtime.E005"),
        ("REALTIME_TASK_SOURCE", "realtime.sources.TaskSource", "realtime.E005"),
        ("REDIS_URL", "127.0.0.1:6379", "realtime.E006"),
        ("REDIS_URL", "redis://127.0.0.1:6379/nine", "realtime.E006"),
        ("REDIS_URL", "redis://127.0.0.1:6379/0?socket_timout=5", "realtime.E006"),
    ],
    ids=[
        "unknown-name",
        "no-lease",
        "no-queue",
        "connection-limit-negative",
        "task-source-misspelt",
        "task-source-not-one",
        "task-source-answering-nothing",
        "redis-url-without-scheme",
        "redis-url-database-not-a-number",
        "redis-url-option-unknown",
    ],
)
@pytest.mark.parametrize("command", ["check", "serve"])
def test_bad_realtime_variables_fail_the_system_checks(variable, value, check, command):
    """The launcher runs the checks too (Daphne does not), and does not serve then."""
    if command == "check":
        arguments = ["manage.py", "check"]
    else:
        arguments = [
            "-m",
            "mcp_platform.serve",
            "-p",
            str(free_port()),
            "mcp_platform.asgi:application",
        ]
    result = subprocess.run(
        [sys.executable, *arguments],
        env={**BASE_ENV, "DJANGO_DEBUG": "1", variable: value},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and check in result.stderr


def test_debug_logging_leaves_out_what_holds_secrets():
    """At DEBUG, Django logs every query's SQL and parameters (password hashes among them)
    and each template variable not found with the page's whole context (its CSRF token)."""
    expression = (
        "[__import__('logging').getLogger(name).isEnabledFor(10)"
        " for name in ('django.db.backends', 'django.template', 'django.request')]"
    )
    assert value_of({"DJANGO_DEBUG": "1", "DJANGO_LOG_LEVEL": "debug"}, expression) == [
        False,
        False,
        True,
    ]


def test_log_lines_are_written_without_tokens_tracebacks_included():
    """A logging call whose arguments do not fit its format is still logging's own error,
    not one raised into its caller."""
    code = (
        "import django, logging; django.setup(); log = logging.getLogger('x')\n"
        "try:\n"
        "    raise ValueError('bad token eyJhbGciOiJIUzI1NiJ9.eyJ1c2VyIjoxfQ.c2lnbmF0dXJl')\n"
        "except ValueError:\n"
        "    log.exception('refused eyJhbGciOiJIUzI1NiJ9.eyJ1c2VyIjoxfQ.c2lnbmF0dXJl')\n"
        "log.warning('value %d', 'not a number')\n"
        "print('went on')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**BASE_ENV, "DJANGO_DEBUG": "1"},
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and result.stdout == "went on\n", result.stderr
    assert "eyJ" not in result.stderr
    assert "refused [redacted]" in result.stderr and "bad token [redacted]" in result.stderr
