"""
The route tree (Klein): which paths exist, which methods they take, and
what is checked before a request is proxied.

Inference routes validate the body (JSON object with a string ``model``,
within the size limit) and hand over to :class:`~olladmr.proxy.Proxy`,
which owns the response from then on.  Everything olladmr answers itself
is JSON; every error is in the OpenAI shape.
"""

from __future__ import annotations

import json
import platform
from urllib.parse import unquote_to_bytes
from typing import TYPE_CHECKING, Any

import twisted
from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from . import __version__
from .errors import ClientError, bad_request, not_found, too_large
from .metrics import CONTENT_TYPE
from .models import normalise_model
from .proxy import Proxy, ProxyCall

if TYPE_CHECKING:
    from .service import OllaService

DMR_PREFIX = b"/olla/dmr"
log = Logger()
ENGINE_PREFIXES = ("/olla/dmr/engines/v1", "/olla/dmr/engines/llama.cpp/v1", "/olla/dmr/engines/vllm/v1")
INFERENCE = ("chat/completions", "completions", "embeddings")
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"]
_TABLE = "/olla/dmr/engines[/llama.cpp|/vllm]/v1/{models,chat/completions,completions,embeddings}"


def _json(request: IRequest, payload: object, status: int = 200) -> bytes:
    return _json_bytes(request, status, json.dumps(payload, separators=(",", ":")).encode("utf-8"))


def _json_bytes(request: IRequest, status: int, body: bytes) -> bytes:
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    return body


def _allow(request: IRequest, *methods: str) -> None:
    """Raise a 405 ClientError unless the request's method is one of ``methods``."""
    method = request.method.decode("latin-1")
    if method in methods or (method == "HEAD" and "GET" in methods):
        return
    allowed = ", ".join(methods + (("HEAD",) if "GET" in methods else ()))
    raise ClientError(
        405,
        f"method {method} is not allowed on {request.path.decode('latin-1')}; allowed: {allowed}",
        "invalid_request_error",
        "method_not_allowed",
        {b"allow": allowed.encode()},
    )


def _parse_model(request: Any) -> str:
    """The ``model`` of a JSON inference body, or a 400/413 ClientError."""
    if request.body_too_large:
        raise too_large(request.site.max_body_size)
    content = request.content
    content.seek(0)
    raw = content.read()
    if not raw.strip():
        raise bad_request("the request body is empty; send a JSON object with a \"model\"", "invalid_json")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise bad_request(f"the request body is not valid JSON: {str(exc)[:200]}", "invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object with a \"model\"", "invalid_json")
    model = body.get("model")
    if model is None or model == "":
        raise bad_request("\"model\" is required, e.g. \"ai/smollm2\"", "model_required")
    if not isinstance(model, str) or not model.strip():
        raise bad_request(f"\"model\" must be a non-empty string, got {type(model).__name__}", "invalid_model")
    if len(model) > 512 or any(ord(c) < 0x20 for c in model):
        raise bad_request("\"model\" is not a valid model name", "invalid_model")
    return model


def render_error(request: IRequest, error: ClientError) -> bytes:
    for name, value in error.headers.items():
        request.responseHeaders.setRawHeaders(name, [value])
    return _json_bytes(request, error.status, error.body())


def internal_error(request: IRequest, failure: Failure) -> bytes:
    """A bug in olladmr: logged with its traceback, answered 500 JSON (never an HTML traceback)."""
    log.failure("internal error handling {method} {path}", failure, method=request.method, path=request.path)
    return render_error(
        request, ClientError(500, "internal error in olladmr (logged)", "server_error", "internal_error")
    )


def _check_routable(request: IRequest) -> None:
    """What Klein/werkzeug would refuse outside its error handling: answer it as JSON first."""
    method = request.method.decode("latin-1")
    if method not in ALL_METHODS:
        raise ClientError(
            405,
            f"method {method[:32]!r} is not supported; olladmr serves {', '.join(ALL_METHODS)}",
            "invalid_request_error",
            "method_not_allowed",
            {b"allow": ", ".join(ALL_METHODS).encode()},
        )
    try:
        unquote_to_bytes(request.path).decode("utf-8")
        (request.getHeader(b"host") or b"").decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("the URL path or Host header is not valid UTF-8", "invalid_url") from None


class IndexedRoutes(Resource):
    """
    The route tree's front door.  The inference routes (the hot path) are
    found by one dict lookup on the exact path and call the same handler the
    Klein table maps them to; every other request goes through Klein.
    """

    isLeaf = True

    def __init__(self, app: OllaApp, klein_resource: Resource) -> None:
        super().__init__()
        self._app = app
        self._gate = app.service.gate
        self._klein = klein_resource
        self._exact = {f"{prefix}/{op}".encode(): op for prefix in ENGINE_PREFIXES for op in INFERENCE}

    def render(self, request: IRequest) -> Any:
        try:
            early = self._gate.admit(request)
            if early is not None:
                return early
            op = self._exact.get(request.path)
            if op is None or request.method != b"POST":
                _check_routable(request)
                return self._klein.render(request)
            return self._app.inference(request, op).render(request)
        except HTTPException as exc:  # werkzeug refusing the URL or Host while binding
            return render_error(request, ClientError(exc.code or 400, exc.description or exc.name, code="bad_request"))
        except ClientError as error:
            return render_error(request, error)
        except Exception:
            return internal_error(request, Failure())


class ProxyResource(Resource):
    """Hands one validated request to the proxy, which owns its response (``NOT_DONE_YET``)."""

    isLeaf = True

    def __init__(self, proxy: Proxy, call: ProxyCall) -> None:
        super().__init__()
        self._proxy = proxy
        self._call = call

    def render(self, request: IRequest) -> int:
        request.proxied = True  # type: ignore[attr-defined]
        self._proxy.handle(request, self._call)
        return NOT_DONE_YET


class OllaApp:
    """Owns the route table; delegates proxying and status to the service."""

    app = Klein()

    def __init__(self, service: OllaService) -> None:
        self.service = service

    def resource(self) -> Resource:
        """The root resource: the Klein route tree behind an exact-path index for the hot routes."""
        return IndexedRoutes(self, self.app.resource())

    # -- errors

    @app.handle_errors(ClientError)
    def _client_error(self, request: IRequest, failure: Failure) -> bytes:
        return render_error(request, failure.value)


    @app.handle_errors(NotFound)
    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        return self._client_error(request, Failure(self._no_route(request)))

    @app.handle_errors(MethodNotAllowed)
    def _bad_method(self, request: IRequest, failure: Failure) -> bytes:
        valid = failure.value.valid_methods or []
        error = ClientError(
            405,
            f"method {request.method.decode('latin-1')} is not allowed here; allowed: {', '.join(valid)}",
            "invalid_request_error",
            "method_not_allowed",
            {b"allow": ", ".join(valid).encode()},
        )
        return self._client_error(request, Failure(error))

    @app.handle_errors(Exception)
    def _internal_error(self, request: IRequest, failure: Failure) -> bytes:
        """Registered last: Klein tries error handlers in order, so routing errors are matched first."""
        return internal_error(request, failure)

    def _no_route(self, request: IRequest) -> ClientError:
        path = request.path.decode("latin-1")
        if request.path.startswith(DMR_PREFIX + b"/"):
            return not_found(
                f"no route {request.method.decode('latin-1')} {path}: olladmr serves {_TABLE} "
                "(DMR model-management routes are never forwarded)",
                "unknown_route",
            )
        return not_found(f"no route {path}", "unknown_route")

    @app.route("/", branch=True, methods=ALL_METHODS)
    def _fallback(self, request: IRequest) -> bytes:
        raise self._no_route(request)

    # -- DMR routes

    for _prefix in ENGINE_PREFIXES:
        app.route(_prefix + "/models", methods=ALL_METHODS, endpoint="models")(lambda self, request: self.models(request))
        for _op in INFERENCE:
            app.route(f"{_prefix}/{_op}", methods=ALL_METHODS, endpoint=f"infer:{_op}")(
                (lambda op: lambda self, request: self.inference(request, op))(_op)
            )
    del _prefix, _op

    def models(self, request: IRequest) -> bytes:
        """The union of the routable endpoints' model lists, each model once, in DMR's shape."""
        _allow(request, "GET")
        data = self.service.catalogue.openai_list()
        return _json(request, {"object": "list", "data": data})

    def inference(self, request: Any, op: str) -> Any:
        _allow(request, "POST")
        model = _parse_model(request)
        call = ProxyCall(
            method=b"POST",
            upstream_path=request.uri[len(DMR_PREFIX) :],
            route=op,
            model=model,
            model_key=normalise_model(model),
            arrived=request.arrived,
        )
        return ProxyResource(self.service.proxy, call)

    # -- catalogue and status

    @app.route("/olla/models", methods=ALL_METHODS)
    def olla_models(self, request: IRequest) -> bytes:
        _allow(request, "GET")
        include = request.args.get(b"include_unavailable", [b"false"])[0].lower() in (b"1", b"true", b"yes")
        return _json(request, self.service.catalogue.olla_list(include_unavailable=include))

    @app.route("/internal/health", methods=ALL_METHODS)
    def health(self, request: IRequest) -> bytes:
        _allow(request, "GET")
        return _json(request, {"status": "healthy"})

    @app.route("/internal/ready", methods=ALL_METHODS)
    def ready(self, request: IRequest) -> bytes:
        _allow(request, "GET")
        ready, reason = self.service.readiness()
        return _json(request, {"status": "ready" if ready else "not_ready", "reason": reason}, 200 if ready else 503)

    @app.route("/internal/status", methods=ALL_METHODS)
    def status(self, request: IRequest) -> bytes:
        _allow(request, "GET")
        return _json(request, self.service.status())

    @app.route("/internal/status/endpoints", methods=ALL_METHODS)
    def status_endpoints(self, request: IRequest) -> bytes:
        _allow(request, "GET")
        return _json(request, self.service.endpoints_status())

    @app.route("/internal/status/models", methods=ALL_METHODS)
    def status_models(self, request: IRequest) -> bytes:
        _allow(request, "GET")
        return _json(request, self.service.models_status())

    @app.route("/internal/reload", methods=ALL_METHODS)
    def reload(self, request: IRequest) -> bytes:
        """Reload the configuration file, like SIGHUP; off unless server.admin.reload_endpoint."""
        if not self.service.config.server.reload_endpoint:
            raise not_found("the reload endpoint is disabled (server.admin.reload_endpoint: false)", "unknown_route")
        _allow(request, "POST")
        result = self.service.reloader.reload()
        return _json(request, {"reloaded": result.ok, "summary": result.summary}, 200 if result.ok else 400)

    @app.route("/internal/metrics", methods=ALL_METHODS)
    def metrics(self, request: IRequest) -> bytes:
        """Prometheus text format, rendered on the reactor thread from the service's own registry."""
        _allow(request, "GET")
        body = self.service.metrics.render()
        request.responseHeaders.setRawHeaders(b"content-type", [CONTENT_TYPE])
        request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        return body

    @app.route("/version", methods=ALL_METHODS)
    def version(self, request: IRequest) -> bytes:
        _allow(request, "GET")
        return _json(
            request,
            {
                "name": "olladmr",
                "version": __version__,
                "python": platform.python_version(),
                "python_implementation": platform.python_implementation(),
                "twisted": twisted.__version__,
            },
        )

