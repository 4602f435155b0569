from rest_framework.routers import SimpleRouter

from mcp_platform.tasks.views import TaskViewSet

router = SimpleRouter()
# With or without the slash: Django's redirect to add it turns a PATCH into a body-less
# request (clients follow a 301 with GET), or into a 500 with DEBUG on.
router.trailing_slash = "/?"
router.register("tasks", TaskViewSet, basename="task")

urlpatterns = router.urls
