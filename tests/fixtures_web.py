"""Fixtures for the Flask app and a live server (filled in by the web work)."""
