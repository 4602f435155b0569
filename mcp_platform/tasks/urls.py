from rest_framework.routers import SimpleRouter

from mcp_platform.tasks.views import TaskViewSet

router = SimpleRouter()
router.register("tasks", TaskViewSet, basename="task")

urlpatterns = router.urls
