"""``manage.py demo_setup``: the demo user and task, for development servers only."""

import io
import os
import subprocess
import sys

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.test import override_settings

from mcp_platform.tasks.management.commands.demo_setup import USERNAME
from mcp_platform.tasks.models import Task
from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.django_db


def test_it_refuses_to_make_its_superuser_with_debug_off():
    """Its password is published: on a production server it was a way in."""
    with override_settings(DEBUG=False), pytest.raises(CommandError, match="DJANGO_DEBUG"):
        call_command("demo_setup", stdout=io.StringIO())
    assert not get_user_model().objects.filter(username=USERNAME).exists()


def test_it_makes_the_demo_user_and_one_task_once_with_debug_on():
    with override_settings(DEBUG=True):
        call_command("demo_setup", stdout=io.StringIO())
        call_command("demo_setup", stdout=io.StringIO())
    user = get_user_model().objects.get(username=USERNAME)
    assert user.is_superuser and user.check_password("demo-password")
    assert Task.objects.filter(owner=user).count() == 1


@override_settings(DEBUG=True)
def test_what_it_prints_names_the_servers_address_and_the_password_that_works():
    out = io.StringIO()
    call_command("demo_setup", "--url", "http://127.0.0.1:8123/", stdout=out)
    assert "password 'demo-password' (admin at http://127.0.0.1:8123/admin/)" in out.getvalue()
    assert out.getvalue().rstrip().endswith("http://127.0.0.1:8123/api/token/")

    user = get_user_model().objects.get(username=USERNAME)
    user.set_password("another-password")
    user.save()
    out = io.StringIO()
    call_command("demo_setup", stdout=out)
    assert "Demo user 'demo', whose password was changed since it was made" in out.getvalue()
    assert "demo-password" not in out.getvalue()
    assert '"password": "<its password>"' in out.getvalue()
    assert "http://127.0.0.1:8000/admin/" in out.getvalue()


def test_a_database_it_cannot_reach_is_one_line_and_exit_1():
    """It was a traceback of some 90 lines."""
    result = subprocess.run(
        [sys.executable, "manage.py", "demo_setup"],
        env={
            "PATH": os.environ.get("PATH", ""),
            "DJANGO_DEBUG": "1",
            "DATABASE_URL": f"postgres://nobody@127.0.0.1:{free_port()}/nothing",
        },
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("CommandError: Could not make the demo user: connection")
