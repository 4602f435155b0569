import pytest

from mcp_platform.tasks import services
from mcp_platform.tasks.models import Task
from mcp_platform.tasks.realtime import TaskSource
from mcp_platform.tasks.selectors import can_see, visible_tasks

pytestmark = pytest.mark.django_db


def test_can_see_agrees_with_visible_tasks(user, other_user, staff_user):
    tasks = [services.create_task(owner=owner, name="t") for owner in (user, other_user)]
    for viewer in (user, other_user, staff_user):
        visible = set(visible_tasks(viewer).values_list("pk", flat=True))
        assert {task.pk for task in tasks if can_see(viewer, task)} == visible & {
            task.pk for task in tasks
        }


def test_get_visible_many_answers_every_request_with_two_queries(
    user, other_user, staff_user, django_assert_num_queries
):
    mine = services.create_task(owner=user, name="mine")
    theirs = services.create_task(owner=other_user, name="theirs")
    missing = Task(owner=user, name="never saved").pk
    requests = [
        (user, mine.pk),
        (user, theirs.pk),
        (staff_user, theirs.pk),
        (other_user, mine.pk),
        (user, missing),
        (user, mine.pk),
    ]
    with django_assert_num_queries(2):  # the tasks, and their users as they are now
        snapshots = TaskSource().get_visible_many(requests)
    assert [s and (s.task_id, s.seq) for s in snapshots] == [
        (mine.pk, 1),
        None,
        (theirs.pk, 1),
        None,
        None,
        (mine.pk, 1),
    ]
    assert snapshots[0].state["name"] == "mine"
    assert TaskSource().get_visible(other_user, theirs.pk) == snapshots[2]


@pytest.mark.parametrize("change", ["deactivated", "deleted", "no longer staff"])
def test_a_user_changed_since_connecting_is_checked_as_they_are_now(staff_user, other_user, change):
    theirs = services.create_task(owner=other_user, name="theirs")
    connected_as = type(staff_user).objects.get(pk=staff_user.pk)  # what a connection holds
    if change == "deleted":
        staff_user.delete()
    else:
        setattr(staff_user, "is_active" if change == "deactivated" else "is_staff", False)
        staff_user.save()
    assert TaskSource().get_visible(connected_as, theirs.pk) is None
