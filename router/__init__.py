"""kars router: an agent gateway in front of models, tool servers and other agents.

``router.app.build_app(settings)`` builds the ASGI application; ``router.settings.load``
reads its settings. The command line is ``kars`` (``router.cli``).
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
