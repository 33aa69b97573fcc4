"""Logging for every process of the service: one format, plus the JSON access log."""
import logging
import sys

ACCESS_LOGGER = "mgeo_service.access"


def configure(level: str) -> None:
    """Plain lines on stderr with the pid (workers share one stream); access lines are bare JSON."""
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
    access = logging.getLogger(ACCESS_LOGGER)
    if not access.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.propagate = False
    # Access lines are INFO: MGEO_LOG_LEVEL=warning or error turns them off with the rest.
    access.setLevel(level.upper())
