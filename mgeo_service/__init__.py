"""mgeo-service: Chinese address matching with MGeo, served by Gunicorn and watched by Prometheus."""

__version__ = "0.1.0"
