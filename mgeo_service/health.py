"""The health endpoints: liveness touches nothing; readiness checks the model (``readiness.py``)."""
from __future__ import annotations

import os
import time

from flask import Blueprint, current_app

from .errors import json_response

health = Blueprint("health", __name__)


@health.get("/health/live")
def live():
    started = current_app.extensions["mgeo"].started
    return json_response({"status": "alive", "uptime_seconds": round(time.time() - started, 3), "pid": os.getpid()})


@health.get("/health/ready")
def ready():
    result = current_app.extensions["mgeo"].readiness.current()
    if result.ready:
        return json_response({"status": "ready", "checks": result.checks})
    return json_response({"status": "not_ready", "reason": result.reason, "checks": result.checks}, 503)


@health.get("/healthz")
def healthz():
    result = current_app.extensions["mgeo"].readiness.current()
    if result.ready:
        return json_response({"status": "ok"})
    return json_response({"status": "not ready", "reason": result.reason}, 503)
