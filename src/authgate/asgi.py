"""The ASGI entry point for servers: ``uvicorn authgate.asgi:app``. Settings come from the
environment (and AUTHGATE_CONFIG), so every worker process builds the same app."""

from authgate.api.app import create_app
from authgate.config import load_settings
from authgate.logging import configure_logging

settings = load_settings()
configure_logging(settings)
app = create_app(settings)
