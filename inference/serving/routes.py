"""The FastAPI app: OpenAI-compatible routes, API-key check, errors in OpenAI's JSON shape.

Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
`GET /v1/models/{model}`, `GET /health` (status + the engine's free/total KV blocks and
running/aborted sequence counts) and `GET /` (the web chat page, `inference/web/index.html`).
With an API key set, every `/v1/` route wants `Authorization: Bearer <key>` (401 otherwise);
`/health` and `/` stay open (the page asks for the key and sends it itself).

Every error answers `{"error": {"message", "type", "param", "code"}}`: 400 for a bad
parameter, malformed JSON (FastAPI's 422 is turned into 400, as OpenAI answers), a prompt over
the context or anything else the request causes (a `UserError`), 401 for a wrong/missing key,
404 for an unknown model or path; 5xx only for the server's own failures.
"""
from __future__ import annotations

import hmac
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from inference.serving.async_engine import AsyncEngine, EngineDeadError
from inference.serving.handlers import ApiError, ServingContext, chat_completion, completion
from inference.serving.protocol import (
    ChatCompletionRequest, CompletionRequest, ErrorDetail, ErrorResponse, ModelCard, ModelList,
)
from utils.errors import UserError

WEB_PAGE = Path(__file__).resolve().parent.parent / "web" / "index.html"


def _ctx(request: Request) -> ServingContext:
    return request.app.state.ctx


def check_api_key(request: Request) -> None:
    """401 unless the request carries the server's key as a Bearer token (when one is set)."""
    key = _ctx(request).api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "You didn't provide an API key. Send it as the header 'Authorization: Bearer <key>'.",
                       code="invalid_api_key")
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")


v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])
plain = APIRouter()


@v1.get("/models")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[ModelCard(id=_ctx(request).model_name)])


@v1.get("/models/{model:path}")
async def get_model(model: str, request: Request) -> ModelCard:
    _ctx(request).check_model(model)
    return ModelCard(id=model)


@v1.post("/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Any:
    return await chat_completion(_ctx(request), body, request)


@v1.post("/completions")
async def create_completion(body: CompletionRequest, request: Request) -> Any:
    return await completion(_ctx(request), body, request)


@plain.get("/health")
async def health(request: Request) -> dict[str, Any]:
    ctx = _ctx(request)
    return {
        "status": "ok" if ctx.async_engine.is_running else "error",
        "model": ctx.model_name,
        "free_blocks": ctx.engine.num_free_blocks,
        "total_blocks": ctx.engine.num_total_blocks,
        "running": ctx.async_engine.num_running,
        "aborted": ctx.async_engine.num_aborted,
    }


@plain.get("/", response_class=HTMLResponse)
async def index() -> HTMLResponse:
    return HTMLResponse(WEB_PAGE.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------- errors
def _error(status: int, detail: ErrorDetail) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=detail).model_dump(), status_code=status)


def _param(loc: tuple) -> Optional[str]:
    """Pydantic's error location → OpenAI's param string, e.g. `messages.[0].role`."""
    parts = [f"[{p}]" if isinstance(p, int) else str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


async def _on_api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.detail)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    try:  # a wrong key outranks a malformed body (FastAPI parses the JSON before dependencies run)
        if request.url.path.startswith("/v1/"):
            check_api_key(request)
    except ApiError as e:
        return _error(e.status, e.detail)
    err = exc.errors()[0]
    loc = tuple(err.get("loc", ()))
    if err["type"] == "json_invalid":
        message = f"We could not parse the JSON body of your request ({err.get('ctx', {}).get('error', 'invalid JSON')})."
        return _error(400, ErrorDetail(message=message, type="invalid_request_error"))
    param = _param(loc)
    if err["type"] == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif err["type"] == "missing" and param is None:
        message = "The request body is missing or is not a JSON object."
    else:
        message = f"{param}: {err['msg']}" if param else err["msg"]
    return _error(400, ErrorDetail(message=message, type="invalid_request_error", param=param))


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        message = f"Unknown path: {request.method} {request.url.path}"
    else:
        message = str(exc.detail)
    return _error(exc.status_code, ErrorDetail(message=message, type="invalid_request_error"))


async def _on_user_error(request: Request, exc: UserError) -> JSONResponse:
    return _error(400, ErrorDetail(message=" ".join(str(exc).split()), type="invalid_request_error"))


async def _on_engine_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
    return _error(503, ErrorDetail(message=str(exc), type="server_error", code="engine_unavailable"))


async def _on_internal_error(request: Request, exc: Exception) -> JSONResponse:
    return _error(500, ErrorDetail(message=f"internal error: {type(exc).__name__}: {exc}", type="server_error"))


# ---------------------------------------------------------------------------- the app
def create_app(engine: Any, model_name: str, api_key: Optional[str] = None) -> FastAPI:
    """The server app around an `LLMEngine`; the engine thread runs while the app is up."""
    async_engine = AsyncEngine(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        try:
            yield
        finally:
            async_engine.shutdown()

    app = FastAPI(title="LLM From Scratch", summary="OpenAI-compatible API", lifespan=lifespan)
    app.state.ctx = ServingContext(engine, async_engine, model_name, api_key or None)
    app.include_router(v1)
    app.include_router(plain)
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(UserError, _on_user_error)
    app.add_exception_handler(EngineDeadError, _on_engine_dead)
    app.add_exception_handler(Exception, _on_internal_error)  # a bug: still answered in OpenAI's shape
    return app
