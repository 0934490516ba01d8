"""The HTTP API of `dept-serve` (FastAPI): routes, JSON errors, the body-size limit and the metrics page.

    app = create_app(DePTService(ServingEngine.load("t5-base", {"sst2": "adapters/sst2"})))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Every refusal is a JSON object with an `error` that says what is wrong and how to fix it (in OpenAI's shape on
the OpenAI routes, see `dept_serve.openai_api`); a refused request leaves the server healthy. `OPTIONS` on a
path answers 204 with its `Allow` methods; another method it does not take, 405 with the same `Allow`. The
OpenAPI spec is at /openapi.json, the interactive docs at /docs.
"""
# No `from __future__ import annotations`: FastAPI reads the routes' body types, built in create_app, at run time.

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException
from starlette.routing import Match

from dept_serve.errors import ErrorJSONResponse, ServeError
from dept_serve.openai_api import add_openai_routes, is_openai_path, openai_error
from dept_serve.schemas import (
    AdapterInfo,
    AdapterList,
    ErrorResponse,
    GenerateResponse,
    Health,
    LoadAdapterRequest,
    ScoreResponse,
    request_models,
)
from dept_serve.service import DePTService

logger = logging.getLogger(__name__)

ERRORS = {status: {"model": ErrorResponse} for status in (400, 403, 404, 409, 413, 422, 500)}


def _error(status: int, message: str, headers: dict | None = None, **extra) -> ErrorJSONResponse:
    return ErrorJSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def error_for(request: Request | dict, status: int, message: str, headers: dict | None = None, **extra):
    """The JSON error answer to `request` (or its ASGI scope): OpenAI's shape on the OpenAI routes, ours elsewhere."""
    path = request["path"] if isinstance(request, dict) else request.url.path
    answer = openai_error if is_openai_path(path) else _error
    return answer(status, message, headers, **extra)


def _body_error(err: Exception) -> str:
    """What made a body unparsable, when it is not a JSON syntax error (those are 422s with their position)."""
    cause = err.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return f"The request body is not valid UTF-8 ({cause.reason} at byte {cause.start}): send UTF-8 JSON."
    if isinstance(cause, RecursionError):
        return "The request body nests JSON arrays or objects too deeply to parse: send the API's flat JSON."
    return f"The request body cannot be parsed as JSON ({type(cause).__name__}): send the API's JSON (see /docs)."


class BodySizeLimit:
    """ASGI middleware: a request body over `max_bytes` is answered 413, and the app never sees it.

    The body is read here first (the app would read it whole anyway), so a streamed body without a
    content-length is cut off as soon as it passes the limit.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = error_for(scope, 413, f"The request body is larger than this server's limit of {self.max_bytes} "
                              "bytes: send fewer or smaller inputs (or start dept-serve with a larger --max_body_bytes).")
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            event = await receive()
            if event["type"] != "http.request":  # the client went away
                return
            chunks.append(event.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await too_large(scope, receive, send)
            if not event.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for the disconnect, as the server would report it
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def create_app(service: DePTService) -> FastAPI:
    """The FastAPI app over a `DePTService`; its lifespan starts and stops the batcher."""
    models = request_models(service.limits)
    GenerateRequest, ScoreRequest = models.generate, models.score  # noqa: N806 - classes

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="dept-serve", version="1", lifespan=lifespan,
                  description="Many DePT adapters over one frozen base model, answered in mixed dynamic batches.")
    app.state.service = service
    app.add_middleware(BodySizeLimit, max_bytes=service.limits.max_body_bytes)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, err: ServeError):
        return error_for(request, err.status_code, err.message, **err.extra)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError):
        detail = [{"loc": [str(part) for part in e.get("loc", ())], "msg": str(e.get("msg")), "type": str(e.get("type"))}
                  for e in err.errors()]
        summary = "; ".join(f"{'.'.join(e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in detail[:3])
        if is_openai_path(request.url.path):
            loc = detail[0]["loc"] if detail else []
            param = loc[1] if len(loc) > 1 and loc[0] == "body" else None  # the field, not its union branch
            return openai_error(400, f"The request does not match the API schema: {summary}", param=param)
        return _error(422, f"The request does not match the API schema (see /docs): {summary}", detail=detail)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        """Starlette's and FastAPI's own refusals (no route, a method a path does not take, a body that cannot be
        parsed), as JSON errors; OPTIONS answers the methods a path takes."""
        if err.status_code == 405:
            allowed = allowed_methods(app, request.scope)
            headers = {"Allow": ", ".join(allowed)}
            if request.method == "OPTIONS":
                return Response(status_code=204, headers=headers)
            return error_for(request, 405, f"{request.method} is not allowed on {request.url.path}: use "
                                           f"{', '.join(m for m in allowed if m != 'OPTIONS')}.", headers)
        if err.status_code == 404:
            return error_for(request, 404, f"No route {request.url.path}: see /docs for the API.")
        if err.status_code == 400:
            return error_for(request, 400, _body_error(err))
        return error_for(request, err.status_code, str(err.detail), err.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):
        logger.exception("Unexpected error on %s %s", request.method, request.url.path)
        return error_for(request, 500, f"Internal error ({type(err).__name__}): {err}")

    @app.post("/v1/generate", response_model=GenerateResponse, responses=ERRORS,
              summary="Generate with an adapter (greedy or beam search); VL adapters take an image per input.")
    async def generate(body: GenerateRequest):
        return await service.generate(body)

    @app.post("/v1/score", response_model=ScoreResponse, responses=ERRORS,
              summary="Classify with a classifier adapter: the label and the probabilities.")
    async def score(body: ScoreRequest):
        return await service.score(body)

    @app.get("/v1/adapters", response_model=AdapterList, summary="The loaded adapters.")
    async def list_adapters():
        return {"base_model": service.engine.model_name_or_path,
                "adapters": [service.engine.adapters[name].info() for name in service.loaded()]}

    @app.post("/v1/adapters", response_model=AdapterInfo, status_code=201, responses=ERRORS,
              summary="Load an adapter from a directory under --adapter_root, without a restart.")
    async def load_adapter(body: LoadAdapterRequest):
        return (await service.load_adapter(body.name, body.path)).info()

    @app.delete("/v1/adapters/{name}", response_model=AdapterList, responses=ERRORS,
                summary="Unload an adapter once its requests in flight are answered; new ones get 404.")
    async def unload_adapter(name: str):
        await service.unload_adapter(name)
        return await list_adapters()

    @app.get("/healthz", response_model=Health, summary="Liveness and the number of loaded adapters.")
    async def healthz():
        return {"status": "ok", "adapters": len(service.loaded()), "queue_depth": service.batcher.queue_depth}

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics (text format).",
             responses={200: {"content": {"text/plain": {}}}})
    async def metrics():
        service.metrics.queue_depth.set(service.batcher.queue_depth)
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    add_openai_routes(app, service)
    return app


def allowed_methods(app: FastAPI, scope: dict) -> list[str]:
    """Every method the routes of this request's path take, with OPTIONS (Starlette's 405 names only the first
    route's, though GET and POST /v1/adapters are two routes)."""
    methods = {"OPTIONS"}
    for route in app.router.routes:
        if getattr(route, "methods", None) and route.matches(scope)[0] != Match.NONE:
            methods |= route.methods
    return sorted(methods)
