"""semcache's admin UI and HTTP API: one Flask app made by :func:`create_app` (served by ``semcache web``).

``web`` reads Redis directly and sends every write to the worker as a task by name; it never imports ``worker``.
"""

from .app import create_app

__all__ = ["create_app"]
