"""API routers, one module per resource; each defines ``router`` (an ``APIRouter`` with its own prefix and tags).

``lyco_api.app.create_app`` mounts every module listed in ``ROUTER_MODULES`` that imports, under ``/api/v1``.
"""

ROUTER_MODULES = ("health", "files", "datasets", "models", "ops", "jobs")
