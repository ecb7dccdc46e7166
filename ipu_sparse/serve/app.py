"""The ASGI application (Starlette): the OpenAI-compatible API and the Lumi chat page.

Routes: ``GET /`` (page), ``GET /static/{file}`` (its script and style sheet),
``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions``,
``POST /v1/completions``. Streaming answers are server-sent events (``data: {...}`` lines,
then ``data: [DONE]``), as the OpenAI API sends them.
"""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, Dict, List

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import UserError
from ..generate import SamplingConfig
from . import protocol as P
from .engine import Busy, Engine, Registry

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
PAGE = "index.html"


def error_response(err: P.ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def load_static() -> Dict[str, bytes]:
    """The page's files (package data), read once."""
    files = {p.name: p.read_bytes() for p in sorted(STATIC_DIR.iterdir()) if p.suffix in STATIC_TYPES}
    if PAGE not in files:
        raise UserError(f"{STATIC_DIR}: the chat page ({PAGE}) is missing from the installed package")
    return files


class EventStream:
    """An ASGI response that sends server-sent events and notices a client that goes away.

    ``events`` yields the encoded events; ``on_disconnect`` is called (once) when the client
    disconnects before the stream ends, so the generation behind it stops and frees its slot.
    """

    def __init__(self, events, on_disconnect):
        self.events, self.on_disconnect = events, on_disconnect

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                                (b"x-accel-buffering", b"no")]})

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.on_disconnect()
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            async for event in self.events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the connection is gone
            self.on_disconnect()
        finally:
            watcher.cancel()
            await self.events.aclose()


def create_app(engines: List[Engine], title: str = "Lumi") -> Starlette:
    """The server for ``engines`` (the first is the model the page talks to; a second one is shown
    beside it for comparison)."""
    registry = Registry(list(engines))
    static = load_static()

    async def page(request: Request) -> Response:
        return Response(static[PAGE], media_type=STATIC_TYPES[".html"])

    async def static_file(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in static:
            raise HTTPException(404)
        return Response(static[name], media_type=STATIC_TYPES[Path(name).suffix],
                        headers={"cache-control": "no-cache"})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "models": [e.status() for e in registry.engines]})

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [e.describe() for e in registry.engines]})

    def find(model_id: str) -> Engine:
        engine = registry.get(model_id)
        if engine is None:
            raise P.ApiError(404, f"The model '{model_id}' does not exist (served: {', '.join(registry.ids())})",
                             param="model", code="model_not_found")
        return engine

    async def get_model(request: Request) -> Response:
        try:
            return JSONResponse(find(request.path_params["model"]).describe())
        except P.ApiError as err:
            return error_response(err)

    async def generation(request: Request, kind: str) -> Response:
        try:
            req = P.parse_generation(P.parse_json(await request.body()), kind)
            engine = find(req.model)
            ids = engine.encode_chat(req.messages) if kind == "chat" else engine.encode(req.prompt)
            err = P.context_error(len(ids), req.max_tokens, engine.context)
            if err is not None:
                raise err
            max_tokens = req.max_tokens or engine.context - len(ids)
            sampling = SamplingConfig(temperature=req.temperature, top_p=req.top_p, seed=req.seed)
            await engine.acquire()
        except P.ApiError as err:
            return error_response(err)
        except Busy as exc:
            return error_response(P.ApiError(503, str(exc), type_="server_error", code="server_busy"))
        return await run(engine, req, ids, max_tokens, sampling)

    async def run(engine: Engine, req: P.GenerationRequest, ids, max_tokens: int, sampling) -> Response:
        """Generate with the slot held (``engine.start`` gives it back when the thread is done)."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def emit(text: str) -> None:  # worker thread -> event loop
            loop.call_soon_threadsafe(pieces.put_nowait, text)

        fut = engine.start(ids, max_tokens, sampling, req.stop, emit if req.stream else (lambda s: None), cancel)
        fut.add_done_callback(lambda _f: pieces.put_nowait(None))  # runs in the loop after the last emit
        rid = P.new_id(req.kind)
        if not req.stream:
            try:
                result = await asyncio.shield(fut)
            except asyncio.CancelledError:
                cancel.set()
                raise
            except UserError as exc:  # e.g. the IPU's static KV cache is shorter than asked
                return error_response(P.ApiError(400, str(exc)))
            return JSONResponse(P.full_response(req, rid, engine.id, result))

        async def events():
            try:
                if req.kind == "chat":
                    yield P.sse(P.chunk(req, rid, engine.id, text="", role=True))
                while True:
                    text = await pieces.get()
                    if text is None:
                        break
                    yield P.sse(P.chunk(req, rid, engine.id, text=text))
                try:
                    result = await asyncio.shield(fut)
                except Exception as exc:  # the generation failed after the stream started
                    err = P.ApiError(500, f"generation failed: {exc}", type_="server_error")
                    yield P.sse(err.body())
                    return
                finish = "stop" if result.finish_reason == "stop" else "length"
                yield P.sse(P.chunk(req, rid, engine.id, finish=finish))
                if req.include_usage:
                    yield P.sse(P.usage_chunk(req, rid, engine.id, result))
                yield P.sse(b"[DONE]")
            finally:
                cancel.set()  # no-op when finished; stops a generation whose client went away

        return EventStream(events(), cancel.set)

    async def chat(request: Request) -> Response:
        return await generation(request, "chat")

    async def completions(request: Request) -> Response:
        return await generation(request, "completion")

    async def not_found(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 405:
            return error_response(P.ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                                             code="method_not_allowed"))
        return error_response(P.ApiError(exc.status_code, f"no route {request.method} {request.url.path}",
                                         code="not_found"))

    async def server_error(request: Request, exc: Exception) -> Response:
        return error_response(P.ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error"))

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/static/{name}", static_file, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found, Exception: server_error})
    app.state.registry = registry
    app.state.title = title
    return app


def endpoints(app) -> List[Dict[str, Any]]:
    """(path, methods) of every route (what the page may call)."""
    return [{"path": r.path, "methods": sorted(r.methods or [])} for r in app.routes]
