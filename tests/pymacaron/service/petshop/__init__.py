"""Endpoints and background tasks of the test service."""
