"""Fixtures for a real Celery worker process (filled in by the worker work)."""
