"""The ctr-ad REST service (FastAPI): ``create_app(ServiceSettings(bundle=...))``; run it with ``ctr-ad serve``."""

from service.app import create_app
from service.settings import ServiceSettings

__all__ = ["ServiceSettings", "create_app"]
