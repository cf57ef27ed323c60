"""Composition root: builds the Flask app from settings and hosts the ``civitas`` command."""

from .app import Hub, build_hub, create_app

__all__ = ["Hub", "build_hub", "create_app"]
