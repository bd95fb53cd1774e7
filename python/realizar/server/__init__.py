"""realizar's HTTP server: the seed API and an OpenAI-compatible API on Sanic (DESIGN §4)."""
from .app import create_app, run_server
from .config import ServerConfig
from .errors import APIError

__all__ = ["APIError", "ServerConfig", "create_app", "run_server"]
