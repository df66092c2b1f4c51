"""
The route tree (Klein): which paths exist, which methods they take, and
what is checked before a request is proxied.

Model-routed POSTs validate the body (JSON object with a string
``model``, within the size limit) and hand over to
:class:`~olladmr.proxy.proxy.Proxy`, which owns the response from then
on; so do model look-ups and the Responses API's ``GET``/``DELETE`` of a
stored response (bound to the endpoint that holds it).  Everything
olladmr answers itself is JSON; errors are in the shape of the route's
API (Anthropic's on the Messages routes, OpenAI's elsewhere).
"""

from __future__ import annotations

import json
import platform
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable
from urllib.parse import unquote_to_bytes

import twisted
from klein import Klein
from twisted.logger import Logger
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from . import __version__
from .edge.gate import Gate, GateResource
from .edge.site import OllaRequest
from .errors import (
    ClientError,
    answer_error,
    bad_request,
    dialect_for_path,
    method_not_allowed,
    not_forwarded,
    not_found,
    prepare_error,
    too_large,
    unavailable,
)
from .fleet.aliases import Aliases
from .fleet.catalogue import Catalogue
from .fleet.models import normalise_model
from .fleet.sessions import SessionRouter
from .fleet.view import FleetView, NoAnswer
from .jsonscan import NotAnObject, members
from .ops.dashboard import ASSETS, SECURITY_HEADERS, Dashboard
from .ops.lifecycle import Lifecycle
from .ops.metrics import CONTENT_TYPE, Metrics
from .ops.process import ProcessStats
from .ops.status import StatusReport
from .proxy.affinity import RESPONSE_ID
from .proxy.proxy import Proxy
from .proxy.record import ProxyCall
from .ops.lifecycle import ReloadResult

DMR_PREFIX = b"/olla/dmr"
log = Logger()
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"]
#: DMR's engine prefixes olladmr serves (the default engine and the two explicit ones).
ENGINES = ("/engines", "/engines/llama.cpp", "/engines/vllm")
_TABLE = (
    "/olla/dmr/engines[/llama.cpp|/vllm]/{v1/models[/NAME], v1/chat/completions, v1/completions, v1/embeddings, "
    "v1/messages[/count_tokens], v1/responses[/ID[/input_items]], rerank, score, v1/images/generations}, "
    "/olla/dmr/anthropic/v1/messages[/count_tokens]"
)


@dataclass(frozen=True)
class PostRoute:
    """One model-routed POST route: its metrics label, the DMR path it goes to, the API it speaks."""

    route: str
    upstream: bytes
    api: str = "openai"  # "openai", "anthropic" or "responses"
    passthrough: bool = False  # an Olla Anthropic route served natively: X-Olla-Mode: passthrough


#: (DMR path under an engine prefix, route label, API) of every model-routed POST.
ENGINE_POSTS = (
    ("/v1/chat/completions", "chat/completions", "openai"),
    ("/v1/completions", "completions", "openai"),
    ("/v1/embeddings", "embeddings", "openai"),
    ("/v1/messages", "messages", "anthropic"),
    ("/v1/messages/count_tokens", "messages/count_tokens", "anthropic"),
    ("/v1/responses", "responses", "responses"),
    ("/rerank", "rerank", "openai"),
    ("/score", "score", "openai"),
    ("/v1/images/generations", "images/generations", "openai"),
)
#: Olla's provider-agnostic OpenAI routes, served for the DMR fleet.
OLLA_OPENAI_BASES = ("/olla/proxy/v1", "/olla/openai/v1")
OLLA_OPENAI_POSTS = ("chat/completions", "completions", "embeddings", "responses")
#: DMR's Ollama API routes that generate, routed by model like chat.
OLLAMA_POSTS = ("chat", "generate")
#: How placement reads an Ollama API prompt: as the OpenAI route DMR translates it to.
PROMPT_ROUTES = {"api/chat": "chat/completions", "api/generate": "completions"}


def _post_routes() -> dict[bytes, PostRoute]:
    table: dict[bytes, PostRoute] = {}
    for engine in ENGINES:
        for suffix, route, api in ENGINE_POSTS:
            table[f"/olla/dmr{engine}{suffix}".encode()] = PostRoute(route, f"{engine}{suffix}".encode(), api)
    for suffix, route in (("/v1/messages", "messages"), ("/v1/messages/count_tokens", "messages/count_tokens")):
        table[f"/olla/dmr/anthropic{suffix}".encode()] = PostRoute(route, f"/anthropic{suffix}".encode(), "anthropic")
        table[f"/olla/anthropic{suffix}".encode()] = PostRoute(
            route, f"/anthropic{suffix}".encode(), "anthropic", passthrough=True
        )
    for base in OLLA_OPENAI_BASES:
        for op in OLLA_OPENAI_POSTS:
            api = "responses" if op == "responses" else "openai"
            table[f"{base}/{op}".encode()] = PostRoute(op, f"/engines/v1/{op}".encode(), api)
    for op in OLLAMA_POSTS:  # DMR's Ollama API: DMR translates it itself
        table[f"/olla/dmr/api/{op}".encode()] = PostRoute(f"api/{op}", f"/api/{op}".encode(), "ollama")
    return table


POST_ROUTES = _post_routes()


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


#: Bodies from this size on are read with :func:`~olladmr.jsonscan.members`: only the members routing needs are built.
LARGE_BODY = 64 * 1024
#: The top-level members routing reads, per route (the model; the conversation's opening for affinity; the
#: Responses API's previous_response_id); everything else is validated but never built for a large body.
ROUTING_MEMBERS: dict[str, frozenset[str]] = {
    "chat/completions": frozenset({"model", "messages", "stream"}),
    "messages": frozenset({"model", "system", "messages", "stream"}),
    "responses": frozenset({"model", "previous_response_id", "input", "instructions", "stream"}),
    "completions": frozenset({"model", "prompt", "stream"}),
    "api/chat": frozenset({"model", "name", "messages", "stream"}),
    "api/generate": frozenset({"model", "name", "prompt", "stream"}),
}
_MODEL_ONLY = frozenset({"model"})


def _parse_body(request: OllaRequest, wanted: frozenset[str] = _MODEL_ONLY, member: str = "model") -> dict[str, Any]:
    """
    The JSON object of a model-routed POST (for a large body, only its
    ``wanted`` members), with a valid string ``model``, or a 400/413
    ClientError.  ``member`` names the model when it is not ``model``
    (DMR's Ollama API reads ``name``, else ``model``): the object returned
    has it as ``model``.
    """
    if request.body_too_large:
        raise too_large(request.body_limit)
    content = request.content
    assert content is not None  # set when the headers arrived
    content.seek(0)
    raw = content.read()
    if not raw.strip():
        raise bad_request("the request body is empty; send a JSON object with a \"model\"", "invalid_json")
    try:
        body = json.loads(raw) if len(raw) < LARGE_BODY else members(raw, wanted)
    except NotAnObject:
        body = None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise bad_request(f"the request body is not valid JSON: {str(exc)[:200]}", "invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object with a \"model\"", "invalid_json")
    if member != "model":
        named = body.get(member)
        if isinstance(named, str) and named:
            body = {**body, "model": named}
    model = body.get("model")
    if model is None or model == "":
        raise bad_request("\"model\" is required, e.g. \"ai/smollm2\"", "model_required")
    if not isinstance(model, str) or not model.strip():
        raise bad_request(f"\"model\" must be a non-empty string, got {type(model).__name__}", "invalid_model")
    _check_model_name(model)
    return body


_CONTROL = re.compile("[\x00-\x1f]")


def _check_model_name(model: str) -> None:
    if len(model) > 512 or _CONTROL.search(model) is not None:
        raise bad_request("\"model\" is not a valid model name", "invalid_model")
    try:
        model.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("\"model\" is not valid Unicode (a lone surrogate escape)", "invalid_model") from None


def _query(request: OllaRequest) -> bytes:
    """``?query`` of the request (or nothing), to append to an upstream path."""
    _, sep, query = request.uri.partition(b"?")
    return sep + query


def _upstream(request: OllaRequest) -> bytes:
    """The DMR path of a request under ``/olla/dmr`` (after DMR's aliases), with its query string."""
    return request.path[len(DMR_PREFIX) :] + _query(request)


#: Olla's provider-named prefix for the same routes.
PROVIDER_PREFIX = b"/olla/docker-model-runner"


def canonical_path(path: bytes) -> bytes:
    """
    A request path with DMR's aliases resolved, as olladmr's route table
    knows it: ``/olla/docker-model-runner/...`` is ``/olla/dmr/...``
    (Olla's provider-named prefix); under it, as DMR maps them,
    ``/v1/...`` is ``/engines/v1/...``, ``/rerank`` and ``/score`` are
    ``/engines/rerank`` and ``/engines/score``, and ``/responses...`` and
    ``/engines/responses...`` are ``/engines/v1/responses...``.
    """
    if path.startswith(PROVIDER_PREFIX) and path[len(PROVIDER_PREFIX) : len(PROVIDER_PREFIX) + 1] in (b"", b"/"):
        path = DMR_PREFIX + path[len(PROVIDER_PREFIX) :]
    if not path.startswith(DMR_PREFIX + b"/"):
        return path
    rest = path[len(DMR_PREFIX) :]
    if rest.startswith(b"/v1/"):
        return DMR_PREFIX + b"/engines" + rest
    if rest in (b"/rerank", b"/score"):
        return DMR_PREFIX + b"/engines" + rest
    if rest == b"/responses" or rest.startswith(b"/responses/"):
        return DMR_PREFIX + b"/engines/v1" + rest
    if rest == b"/engines/responses" or rest.startswith(b"/engines/responses/"):
        return DMR_PREFIX + b"/engines/v1" + rest[len(b"/engines") :]
    return path


def translator_stats() -> dict[str, object]:
    """Olla's ``/internal/stats/translators`` document with no translators: olladmr translates nothing."""
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "translators": [],
        "summary": {
            "overall_success_rate": "0%", "overall_passthrough_rate": "0%", "total_translators": 0,
            "active_translators": 0, "total_requests": 0, "total_passthrough": 0, "total_translations": 0,
            "total_streaming": 0, "total_non_streaming": 0,
        },
    }


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
    The route tree behind the gate: the model-routed POSTs (the hot path)
    are found by one dict lookup on the exact path; every other request goes
    through Klein.  A failure is answered by :func:`~olladmr.errors.answer_error`.
    """

    isLeaf = True

    def __init__(self, app: OllaApp, klein_resource: Resource) -> None:
        super().__init__()
        self._app = app
        self._klein = klein_resource

    def render(self, request: OllaRequest) -> Any:
        try:
            spec = POST_ROUTES.get(request.path)
            if spec is None or request.method != b"POST":
                _check_routable(request)
                if isinstance(request, OllaRequest):
                    request.resource_path()  # Klein reads prepath and postpath
                return self._klein.render(request)
            return self._app.post(request, spec).render(request)
        except Exception:
            return answer_error(request, Failure())


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


class EventStreamResource(Resource):
    """Opens one dashboard event stream on the request (``NOT_DONE_YET``: the dashboard writes it from then on)."""

    isLeaf = True

    def __init__(self, dashboard: Dashboard) -> None:
        super().__init__()
        self._dashboard = dashboard

    def render(self, request: OllaRequest) -> Any:
        headers = request.responseHeaders
        for name, value in SECURITY_HEADERS.items():
            headers.setRawHeaders(name, [value])
        headers.setRawHeaders(b"content-type", [b"text/event-stream; charset=utf-8"])
        headers.setRawHeaders(b"x-accel-buffering", [b"no"])
        if request.method == b"HEAD":
            return b""
        if self._dashboard.subscribe(request) is None:
            error = ClientError(503, "too many dashboard event streams are open", "server_busy")
            error.headers = {b"retry-after": b"5"}
            return prepare_error(request, error)
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
        aliases: Aliases,
        sessions: SessionRouter,
        status: StatusReport,
        metrics: Metrics,
        lifecycle: Lifecycle,
        process: ProcessStats,
        dashboard: Dashboard,
        reload: Callable[[], ReloadResult],
        view: FleetView,
    ) -> None:
        self._proxy = proxy
        self._catalogue = catalogue
        self._aliases = aliases
        self._sessions = sessions
        self._status = status
        self._metrics = metrics
        self._lifecycle = lifecycle
        self._process = process
        self._dashboard = dashboard
        self._reload = reload
        self._view_of = view

    def resource(self, gate: Gate) -> Resource:
        """The root resource: the gate, then the Klein route tree behind an exact-path index for the hot routes."""
        return GateResource(gate, IndexedRoutes(self, self.app.resource()), canonical_path)

    # -- errors

    @app.handle_errors(ClientError)
    def _client_error(self, request: IRequest, failure: Failure) -> bytes:
        return answer_error(request, failure)

    @app.handle_errors(Exception)
    def _internal_error(self, request: IRequest, failure: Failure) -> bytes:
        """Registered last: Klein tries error handlers in order."""
        return answer_error(request, failure)

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

    # -- the route table

    for _path in POST_ROUTES:
        app.route(_path.decode(), methods=ALL_METHODS, endpoint=f"post:{_path.decode()}")(
            lambda self, request: self.post_method(request)
        )
    for _engine in ENGINES:
        _base = f"/olla/dmr{_engine}/v1"
        app.route(f"{_base}/models", methods=ALL_METHODS, endpoint=f"models:{_base}")(
            lambda self, request: self.models(request)
        )
        app.route(f"{_base}/models/<path:name>", methods=ALL_METHODS, endpoint=f"model:{_base}")(
            lambda self, request, name: self.model(request, name)
        )
    for _base in [f"/olla/dmr{engine}/v1" for engine in ENGINES] + list(OLLA_OPENAI_BASES):
        app.route(f"{_base}/responses/<rid>", methods=ALL_METHODS, endpoint=f"response:{_base}")(
            lambda self, request, rid: self.response(request, rid, "")
        )
        app.route(f"{_base}/responses/<rid>/input_items", methods=ALL_METHODS, endpoint=f"items:{_base}")(
            lambda self, request, rid: self.response(request, rid, "/input_items")
        )
    for _base in OLLA_OPENAI_BASES:
        app.route(f"{_base}/models", methods=ALL_METHODS, endpoint=f"models:{_base}")(
            lambda self, request: self.models(request)
        )
    del _path, _engine, _base

    def post_method(self, request: OllaRequest) -> bytes:
        """
        Klein's view of a model-routed POST route: reached only by other
        methods (a POST to the exact path is dispatched by
        :class:`IndexedRoutes` without Klein), so it answers 405.
        """
        _allow(request, "POST")
        raise self._no_route(request)

    def post(self, request: OllaRequest, spec: PostRoute) -> Resource:
        """A model-routed POST: its body validated here, proxied by the resource returned."""
        _allow(request, "POST")
        ollama = spec.api == "ollama"
        body = _parse_body(request, ROUTING_MEMBERS.get(spec.route, _MODEL_ONLY), "name" if ollama else "model")
        model: str = body["model"]
        named = body.get("name")
        member = "name" if ollama and isinstance(named, str) and named else "model"
        if spec.route == "api/generate" and not body.get("prompt"):
            raise not_forwarded(
                "a /api/generate without a prompt (on DMR it unloads the model, or reconfigures its runner)")
        key = normalise_model(model)
        admission = request.admission
        headers = admission.headers
        if spec.passthrough:
            headers = {**headers, b"x-olla-mode": b"passthrough"}
        response_id = None
        if spec.api == "responses":
            previous = body.get("previous_response_id")
            if isinstance(previous, str) and RESPONSE_ID.fullmatch(previous):
                response_id = previous
        session = None
        if response_id is None:
            peer = request.getClientAddress()
            session = self._sessions.key_for(
                route=PROMPT_ROUTES.get(spec.route, spec.route),
                model_key=key,
                headers=request.requestHeaders,
                body=body,
                client_ip=getattr(peer, "host", "") or "",
            )
        call = ProxyCall(
            method=b"POST",
            upstream_path=spec.upstream + _query(request),
            route=spec.route,
            model=model,
            model_key=key,
            arrived=request.arrived,
            request_id=request.request_id,
            response_headers=headers,
            forward_credentials=admission.forward_credentials,
            api=spec.api,
            alias=self._aliases.get(key),
            response_id=response_id,
            capture_response=spec.route == "responses",
            session=session,
            affinity_reported=True,
            model_member=member,
            streamed=body.get("stream") is not False if ollama else body.get("stream") is True,
            ndjson=ollama and body.get("stream") is not False,  # (stream absent means streamed, as in Ollama)
        )
        return ProxyResource(self._proxy, call)

    def models(self, request: OllaRequest) -> bytes:
        """The union of the routable endpoints' model lists (and the aliases), each model once, in DMR's shape."""
        _allow(request, "GET")
        return _json(request, {"object": "list", "data": self._catalogue.openai_list()})

    def model(self, request: OllaRequest, name: str) -> Resource:
        """``GET .../v1/models/{name...}``: proxied to an endpoint that lists the model (404 when none does)."""
        _allow(request, "GET")
        _check_model_name(name)
        key = normalise_model(name)
        admission = request.admission
        return ProxyResource(
            self._proxy,
            ProxyCall(
                method=request.method,
                upstream_path=_upstream(request),
                route="models/get",
                model=name,
                model_key=key,
                arrived=request.arrived,
                request_id=request.request_id,
                response_headers=admission.headers,
                forward_credentials=admission.forward_credentials,
                alias=self._aliases.get(key),
            ),
        )

    def response(self, request: OllaRequest, rid: str, tail: str) -> Resource:
        """``GET``/``DELETE .../v1/responses/{id}[/input_items]``: proxied to the endpoint holding that response."""
        if tail:
            _allow(request, "GET")
        else:
            _allow(request, "GET", "DELETE")
        if not RESPONSE_ID.fullmatch(rid):
            raise not_found(f"no response {rid[:64]!r}: response ids look like resp_...", "not_found")
        admission = request.admission
        upstream = f"/engines/v1/responses/{rid}{tail}".encode() + _query(request)
        if request.path.startswith(DMR_PREFIX + b"/"):
            upstream = _upstream(request)
        delete = request.method == b"DELETE"
        return ProxyResource(
            self._proxy,
            ProxyCall(
                method=request.method,
                upstream_path=upstream,
                route="responses/delete" if delete else ("responses/input_items" if tail else "responses/get"),
                arrived=request.arrived,
                request_id=request.request_id,
                response_headers=admission.headers,
                forward_credentials=admission.forward_credentials,
                api="responses",
                response_id=rid,
                forget_response=delete,
            ),
        )

    # -- DMR's Ollama API (chat and generate are model-routed POSTs) and the fleet's management view

    def _view(self, request: OllaRequest, read: Callable[[], Awaitable[Any]], missing: str = "") -> Deferred[bytes]:
        """
        Answer a fleet-wide management read as JSON: 404 ``missing`` when
        it finds nothing, 503 in the route's shape when no endpoint answers.
        """

        async def answer() -> bytes:
            try:
                document = await read()
            except NoAnswer as exc:
                return prepare_error(request, unavailable(str(exc), "no_endpoints_available", 5),
                                     dialect_for_path(request.path))
            if document is None:
                return prepare_error(request, not_found(missing, "model_not_found"), dialect_for_path(request.path))
            return _json(request, document)

        return Deferred.fromCoroutine(answer())

    # The fleet's read-only documents, each merged from every routable endpoint (FleetView): DMR's Ollama list,
    # loaded models and version, and what the docker model CLI reads (ls, ps, df, status, version).
    for _fleet_path, _fleet_read in (
        ("/olla/dmr/api/tags", lambda self: self._view_of.ollama_tags()),
        ("/olla/dmr/api/ps", lambda self: self._view_of.ollama_ps()),
        ("/olla/dmr/api/version", lambda self: self._view_of.version(__version__, "/api/version")),
        ("/olla/dmr/models", lambda self: self._view_of.models()),
        ("/olla/dmr/engines/ps", lambda self: self._view_of.engines_ps()),
        ("/olla/dmr/engines/df", lambda self: self._view_of.engines_df()),
        ("/olla/dmr/engines/status", lambda self: self._view_of.engines_status()),
        ("/olla/dmr/version", lambda self: self._view_of.version(__version__)),
    ):
        app.route(_fleet_path, methods=ALL_METHODS, endpoint=f"fleet:{_fleet_path}")(
            lambda self, request, _fleet_read=_fleet_read: self.fleet_document(request, _fleet_read)
        )
    del _fleet_path, _fleet_read

    def fleet_document(self, request: OllaRequest, read: Callable[[OllaApp], Awaitable[Any]]) -> Deferred[bytes]:
        """``GET`` one of the fleet's documents above."""
        _allow(request, "GET")
        return self._view(request, lambda: read(self))

    @app.route("/olla/dmr/api/show", methods=ALL_METHODS)
    def ollama_show(self, request: OllaRequest) -> Resource:
        """``POST /api/show``: proxied to an endpoint that lists the model."""
        _allow(request, "POST")
        body = _parse_body(request, _MODEL_ONLY | {"name"}, "name")
        model: str = body["model"]
        key = normalise_model(model)
        admission = request.admission
        named = body.get("name")
        return ProxyResource(
            self._proxy,
            ProxyCall(
                method=b"POST",
                upstream_path=_upstream(request),
                route="api/show",
                model=model,
                model_key=key,
                arrived=request.arrived,
                request_id=request.request_id,
                response_headers=admission.headers,
                forward_credentials=admission.forward_credentials,
                api="ollama",
                alias=self._aliases.get(key),
                model_member="name" if isinstance(named, str) and named else "model",
            ),
        )

    @app.route("/olla/dmr/api/pull", methods=ALL_METHODS)
    def ollama_pull(self, request: OllaRequest) -> bytes:
        _allow(request, "POST")
        raise not_forwarded("/api/pull (it downloads a model onto a DMR)")

    @app.route("/olla/dmr/api/delete", methods=ALL_METHODS)
    def ollama_delete(self, request: OllaRequest) -> bytes:
        _allow(request, "DELETE")
        raise not_forwarded("/api/delete (it deletes a model from a DMR)")

    @app.route("/olla/dmr/models/<path:name>", methods=ALL_METHODS)
    def dmr_model(self, request: OllaRequest, name: str) -> Deferred[bytes]:
        """What ``docker model inspect`` reads; every write under ``/models/`` is refused."""
        if request.method not in (b"GET", b"HEAD"):
            _allow(request, "GET", "POST", "DELETE")
            raise not_forwarded(f"{request.method.decode('latin-1')} /models/{name[:200]} (model management)")
        if name.endswith("/export"):
            raise not_forwarded("GET /models/.../export (a bulk download of a model)")
        _check_model_name(name)
        return self._view(request, lambda: self._view_of.model(name), f"model {name!r} was not found on any endpoint")

    @app.route("/olla/dmr/engines/requests", methods=ALL_METHODS)
    def engines_requests(self, request: OllaRequest) -> bytes:
        raise not_forwarded("/engines/requests (it holds every recent prompt and answer of a DMR)", reads=True)

    for _write in ("/olla/dmr/engines/unload", "/olla/dmr/engines/_configure", "/olla/dmr/engines/<backend>/_configure",
                   "/olla/dmr/engines/install-backend", "/olla/dmr/engines/uninstall-backend"):
        app.route(_write, methods=ALL_METHODS, endpoint=f"refuse:{_write}")(
            lambda self, request, **_: self.refuse(request)
        )
    del _write

    def refuse(self, request: OllaRequest) -> bytes:
        """A DMR write (runners, backends): never forwarded."""
        raise not_forwarded(f"{request.method.decode('latin-1')} {request.path.decode('latin-1')[len('/olla/dmr'):]}")

    # -- catalogue and status

    @app.route("/olla/models", methods=ALL_METHODS)
    def olla_models(self, request: OllaRequest) -> bytes:
        _allow(request, "GET")
        include = request.args.get(b"include_unavailable", [b"false"])[0].lower() in (b"1", b"true", b"yes")
        return _json(request, self._catalogue.olla_list(include_unavailable=include))

    @app.route("/olla/models/<path:model_id>", methods=ALL_METHODS)
    def olla_model(self, request: OllaRequest, model_id: str) -> bytes:
        """One model by id or alias; ids may contain ``/`` (``ai/smollm2``), which Olla cannot look up."""
        _allow(request, "GET")
        entry = self._catalogue.olla_model(model_id)
        if entry is None:
            raise not_found(f"model {model_id!r} was not found on any endpoint", "model_not_found")
        return _json(request, entry)

    @app.route("/internal/ready", methods=ALL_METHODS)
    def ready(self, request: OllaRequest) -> bytes:
        _allow(request, "GET")
        ready, reason = self._status.readiness()
        return _json(request, {"status": "ready" if ready else "not_ready", "reason": reason}, 200 if ready else 503)

    # The read-only documents: one GET each, answered as JSON from the part that owns it.
    for _document, _read in (
        ("/internal/health", lambda self: {"status": "healthy"}),
        ("/internal/status", lambda self: self._status.service()),
        ("/internal/status/endpoints", lambda self: self._status.endpoints()),
        ("/internal/status/models", lambda self: self._status.models()),
        ("/internal/stats/models", lambda self: self._status.model_stats()),  # Olla's per-model statistics
        ("/internal/stats/sticky", lambda self: self._sessions.stats()),  # Olla's session-affinity statistics
        ("/internal/stats/translators", lambda self: translator_stats()),  # Olla's: none, DMR speaks every API
        ("/internal/process", lambda self: self._process.snapshot()),  # memory, GC, threads, uptime, versions
        ("/olla/anthropic/v1/models", lambda self: self._catalogue.anthropic_list()),  # Anthropic's list shape
    ):
        app.route(_document, methods=ALL_METHODS, endpoint=f"document:{_document}")(
            lambda self, request, _read=_read: self.document(request, _read)
        )
    del _document, _read

    def document(self, request: OllaRequest, read: Callable[[OllaApp], object]) -> bytes:
        """``GET`` one of the read-only documents above."""
        _allow(request, "GET")
        return _json(request, read(self))

    @app.route("/internal/reload", methods=ALL_METHODS)
    def reload(self, request: OllaRequest) -> bytes:
        """Reload the configuration file, like SIGHUP; off unless server.admin.reload_endpoint."""
        if not self._lifecycle.config.server.reload_endpoint:
            raise not_found("the reload endpoint is disabled (server.admin.reload_endpoint: false)", "unknown_route")
        _allow(request, "POST")
        result = self._reload()
        return _json(request, {"reloaded": result.ok, "summary": result.summary}, 200 if result.ok else 400)

    # -- the dashboard

    def _dashboard_on(self, request: OllaRequest) -> None:
        _allow(request, "GET")
        if not self._dashboard.enabled:
            raise not_found("the dashboard is disabled (server.admin.dashboard: false)", "unknown_route")

    @app.route("/internal/ui", methods=ALL_METHODS)
    def ui_redirect(self, request: OllaRequest) -> bytes:
        self._dashboard_on(request)
        request.setResponseCode(301)
        request.responseHeaders.setRawHeaders(b"location", [b"/internal/ui/"])
        return b""

    @app.route("/internal/ui/", methods=ALL_METHODS)
    def ui_page(self, request: OllaRequest) -> bytes:
        return self._asset(request, "index.html")

    @app.route("/internal/ui/<string:name>", methods=ALL_METHODS)
    def ui_file(self, request: OllaRequest, name: str) -> Any:
        if name == "events":
            self._dashboard_on(request)
            return EventStreamResource(self._dashboard)
        if name == "snapshot":
            self._dashboard_on(request)
            body = _json(request, {**self._dashboard.snapshot(), "events": self._dashboard.events.recent()})
            request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
            return body
        if name not in ASSETS or name == "index.html":
            raise not_found(f"no dashboard file {name!r}", "unknown_route")
        return self._asset(request, name)

    def _asset(self, request: OllaRequest, name: str) -> bytes:
        self._dashboard_on(request)
        body = self._dashboard.assets[name]
        headers = request.responseHeaders
        for header, value in SECURITY_HEADERS.items():
            headers.setRawHeaders(header, [value])
        headers.setRawHeaders(b"content-type", [ASSETS[name]])
        headers.setRawHeaders(b"content-length", [b"%d" % len(body)])
        return b"" if request.method == b"HEAD" else body

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
