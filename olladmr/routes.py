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
from typing import Any, Callable, cast
from urllib.parse import unquote_to_bytes

import twisted
from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from werkzeug.exceptions import HTTPException

from . import __version__
from .edge.gate import Admission, Gate
from .edge.site import OllaRequest
from .errors import ClientError, bad_request, internal_error, method_not_allowed, not_found, prepare_error, too_large
from .fleet.catalogue import Catalogue
from .fleet.models import normalise_model
from .ops.lifecycle import Lifecycle
from .ops.metrics import CONTENT_TYPE, Metrics
from .ops.status import StatusReport
from .proxy.headers import add_response_headers
from .proxy.proxy import Proxy
from .proxy.record import ProxyCall
from .reload import ReloadResult

DMR_PREFIX = b"/olla/dmr"
log = Logger()
ENGINE_PREFIXES = ("/olla/dmr/engines/v1", "/olla/dmr/engines/llama.cpp/v1", "/olla/dmr/engines/vllm/v1")
INFERENCE = ("chat/completions", "completions", "embeddings")
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"]
_TABLE = "/olla/dmr/engines[/llama.cpp|/vllm]/v1/{models,chat/completions,completions,embeddings}"


def _json(request: OllaRequest, payload: object, status: int = 200) -> bytes:
    return _json_bytes(request, status, json.dumps(payload, separators=(",", ":")).encode("utf-8"))


def _json_bytes(request: OllaRequest, status: int, body: bytes) -> bytes:
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    return body


def _allow(request: OllaRequest, *methods: str) -> None:
    """Raise a 405 ClientError unless the request's method is one of ``methods``."""
    method = request.method.decode("latin-1")
    if method in methods or (method == "HEAD" and "GET" in methods):
        return
    raise method_not_allowed(method, methods + (("HEAD",) if "GET" in methods else ()), request.path.decode("latin-1"))


def _parse_model(request: OllaRequest) -> str:
    """The ``model`` of a JSON inference body, or a 400/413 ClientError."""
    if request.body_too_large:
        # Site.buildProtocol sets ``channel.site``; Twisted's HTTPChannel does not declare it.
        raise too_large(request.channel.site.limits.max_body_size)  # type: ignore[attr-defined]
    content = request.content
    assert content is not None  # set when the headers arrived
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


def internal_error_answer(request: IRequest, failure: Failure) -> bytes:
    """A bug in olladmr: logged with its traceback, answered 500 JSON (never an HTML traceback)."""
    log.failure("internal error handling {method} {path}", failure, method=request.method, path=request.path)
    return prepare_error(request, internal_error())


def _check_routable(request: OllaRequest) -> None:
    """What Klein/werkzeug would refuse outside its error handling: answer it as JSON first."""
    method = request.method.decode("latin-1")
    if method not in ALL_METHODS:
        raise method_not_allowed(repr(method[:32]), ALL_METHODS)
    try:
        unquote_to_bytes(request.path).decode("utf-8")
        (request.getHeader(b"host") or b"").decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("the URL path or Host header is not valid UTF-8", "invalid_url") from None


class IndexedRoutes(Resource):
    """
    The route tree's front door: the gate first, then the routes.  The
    inference routes (the hot path) are found by one dict lookup on the
    exact path and call the same handler the Klein table maps them to;
    every other request goes through Klein.
    """

    isLeaf = True

    def __init__(self, app: OllaApp, gate: Gate, klein_resource: Resource) -> None:
        super().__init__()
        self._app = app
        self._gate = gate
        self._klein = klein_resource
        self._exact = {f"{prefix}/{op}".encode(): op for prefix in ENGINE_PREFIXES for op in INFERENCE}

    def render(self, request: OllaRequest) -> Any:
        headers = request.responseHeaders
        headers.removeHeader(b"server")  # no version advertising
        try:
            admission = self._gate.admit(request)
            if admission.headers:
                add_response_headers(headers, admission.headers)
            if admission.preflight is not None:
                request.setResponseCode(admission.preflight)
                return b""
            op = self._exact.get(request.path)
            if op is None or request.method != b"POST":
                _check_routable(request)
                return self._klein.render(request)
            return self._app.inference(request, op, admission).render(request)
        except HTTPException as exc:  # werkzeug refusing the URL or Host while binding
            return prepare_error(request, ClientError(exc.code or 400, exc.description or exc.name, code="bad_request"))
        except ClientError as error:
            return prepare_error(request, error)
        except Exception:
            return internal_error_answer(request, Failure())


class ProxyResource(Resource):
    """Hands one validated request to the proxy, which owns its response from then on (``NOT_DONE_YET``)."""

    isLeaf = True

    def __init__(self, proxy: Proxy, call: ProxyCall) -> None:
        super().__init__()
        self._proxy = proxy
        self._call = call

    def render(self, request: OllaRequest) -> int:
        request.proxied = True
        self._proxy.handle(request, self._call)
        return NOT_DONE_YET


class OllaApp:
    """
    Owns the route table (one Klein class): which paths exist, which
    methods they take, what is checked before a request is proxied.  It is
    given the parts its handlers read; it holds no state of its own.
    """

    app = Klein()

    def __init__(
        self,
        *,
        proxy: Proxy,
        catalogue: Catalogue,
        status: StatusReport,
        metrics: Metrics,
        lifecycle: Lifecycle,
        reload: Callable[[], ReloadResult],
    ) -> None:
        self._proxy = proxy
        self._catalogue = catalogue
        self._status = status
        self._metrics = metrics
        self._lifecycle = lifecycle
        self._reload = reload

    def resource(self, gate: Gate) -> Resource:
        """The root resource: the gate and the Klein route tree behind an exact-path index for the hot routes."""
        return IndexedRoutes(self, gate, self.app.resource())

    # -- errors

    @app.handle_errors(ClientError)
    def _client_error(self, request: IRequest, failure: Failure) -> bytes:
        return prepare_error(request, cast(ClientError, failure.value))  # registered for ClientError only

    @app.handle_errors(Exception)
    def _internal_error(self, request: IRequest, failure: Failure) -> bytes:
        """Registered last: Klein tries error handlers in order."""
        return internal_error_answer(request, failure)

    def _no_route(self, request: OllaRequest) -> ClientError:
        path = request.path.decode("latin-1")
        if request.path.startswith(DMR_PREFIX + b"/"):
            return not_found(
                f"no route {request.method.decode('latin-1')} {path}: olladmr serves {_TABLE} "
                "(DMR model-management routes are never forwarded)",
                "unknown_route",
            )
        return not_found(f"no route {path}", "unknown_route")

    @app.route("/", branch=True, methods=ALL_METHODS)
    def _fallback(self, request: OllaRequest) -> bytes:
        raise self._no_route(request)

    # -- DMR routes

    for _prefix in ENGINE_PREFIXES:
        app.route(_prefix + "/models", methods=ALL_METHODS, endpoint="models")(lambda self, request: self.models(request))
        for _op in INFERENCE:
            app.route(f"{_prefix}/{_op}", methods=ALL_METHODS, endpoint=f"infer:{_op}")(
                lambda self, request: self.inference_method(request)
            )
    del _prefix, _op

    def models(self, request: OllaRequest) -> bytes:
        """The union of the routable endpoints' model lists, each model once, in DMR's shape."""
        _allow(request, "GET")
        data = self._catalogue.openai_list()
        return _json(request, {"object": "list", "data": data})

    def inference_method(self, request: OllaRequest) -> bytes:
        """
        Klein's view of an inference route: reached only by methods other
        than POST (a POST to the exact path is dispatched by
        :class:`IndexedRoutes` without Klein), so it answers 405.
        """
        _allow(request, "POST")
        raise self._no_route(request)

    def inference(self, request: OllaRequest, op: str, admission: Admission) -> Resource:
        """A POST to an inference route: validated here, proxied by the resource returned."""
        _allow(request, "POST")
        model = _parse_model(request)
        call = ProxyCall(
            method=b"POST",
            upstream_path=request.uri[len(DMR_PREFIX) :],
            route=op,
            model=model,
            model_key=normalise_model(model),
            arrived=request.arrived,
            request_id=request.request_id,
            response_headers=admission.headers,
            forward_credentials=admission.forward_credentials,
        )
        return ProxyResource(self._proxy, call)

    # -- catalogue and status

    @app.route("/olla/models", methods=ALL_METHODS)
    def olla_models(self, request: OllaRequest) -> bytes:
        _allow(request, "GET")
        include = request.args.get(b"include_unavailable", [b"false"])[0].lower() in (b"1", b"true", b"yes")
        return _json(request, self._catalogue.olla_list(include_unavailable=include))

    @app.route("/internal/health", methods=ALL_METHODS)
    def health(self, request: OllaRequest) -> bytes:
        _allow(request, "GET")
        return _json(request, {"status": "healthy"})

    @app.route("/internal/ready", methods=ALL_METHODS)
    def ready(self, request: OllaRequest) -> bytes:
        _allow(request, "GET")
        ready, reason = self._status.readiness()
        return _json(request, {"status": "ready" if ready else "not_ready", "reason": reason}, 200 if ready else 503)

    @app.route("/internal/status", methods=ALL_METHODS)
    def status(self, request: OllaRequest) -> bytes:
        _allow(request, "GET")
        return _json(request, self._status.service())

    @app.route("/internal/status/endpoints", methods=ALL_METHODS)
    def status_endpoints(self, request: OllaRequest) -> bytes:
        _allow(request, "GET")
        return _json(request, self._status.endpoints())

    @app.route("/internal/status/models", methods=ALL_METHODS)
    def status_models(self, request: OllaRequest) -> bytes:
        _allow(request, "GET")
        return _json(request, self._status.models())

    @app.route("/internal/reload", methods=ALL_METHODS)
    def reload(self, request: OllaRequest) -> bytes:
        """Reload the configuration file, like SIGHUP; off unless server.admin.reload_endpoint."""
        if not self._lifecycle.config.server.reload_endpoint:
            raise not_found("the reload endpoint is disabled (server.admin.reload_endpoint: false)", "unknown_route")
        _allow(request, "POST")
        result = self._reload()
        return _json(request, {"reloaded": result.ok, "summary": result.summary}, 200 if result.ok else 400)

    @app.route("/internal/metrics", methods=ALL_METHODS)
    def metrics(self, request: OllaRequest) -> bytes:
        """Prometheus text format, rendered on the reactor thread from the service's own registry."""
        _allow(request, "GET")
        body = self._metrics.render()
        request.responseHeaders.setRawHeaders(b"content-type", [CONTENT_TYPE])
        request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        return body

    @app.route("/version", methods=ALL_METHODS)
    def version(self, request: OllaRequest) -> bytes:
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
