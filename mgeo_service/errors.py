"""Every error answer is ``{"error": {"code", "message"}}`` with a 4xx (429, 503, 504 where the
service cannot answer now); none echoes an address back."""
from __future__ import annotations

import json
import logging

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed",
               413: "payload_too_large", 415: "unsupported_media_type"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_body(code: str, message: str) -> str:
    return json.dumps({"error": {"code": code, "message": message}})


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> Response:
    g.error_code = code  # for the request's trace span
    return Response(error_body(code, message), status=status, mimetype="application/json", headers=headers)


def json_response(payload: dict, status: int = 200) -> Response:
    return Response(json.dumps(payload, ensure_ascii=False), status=status, mimetype="application/json")


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        code = _HTTP_CODES.get(exc.code, "http_error")
        headers = {"Allow": ", ".join(exc.valid_methods)} if getattr(exc, "valid_methods", None) else None
        return error_response(exc.code or 500, code, exc.description or code, headers)

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception):
        log.exception("unexpected error answering %s %s", request.method, g.get("endpoint"))
        return error_response(500, "internal_error", "unexpected error; see the service log")
