"""The HTTP face of `lemoe serve` (FastAPI): OpenAI-compatible completions and chat completions, plus the
editing API. Every response to a bad request is a 4xx in OpenAI's error shape naming the field."""

from __future__ import annotations

import hmac
import json
import threading
import time
import uuid
from typing import Any, Iterator

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..data import DataError
from ..persistence import AdapterError
from .schemas import ChatRequest, CompletionRequest, EditBatch, Limits, Rollback, Sampling
from .service import Completion, ServedModel, stream_pieces

EXPERT_FIELD = "lemoe_expert"  # per choice: the expert the request was routed to, or null


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": None}})


class BodyLimit:
    """Refuse request bodies above `limit` bytes (413), by Content-Length and by what actually arrives."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await _error(413, f"request body larger than {self.limit} bytes")(scope, receive, send)
            return
        seen = 0

        async def bounded() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, f"request body larger than {self.limit} bytes")
            return message

        await self.app(scope, bounded, send)


def create_app(served: ServedModel, api_key: str | None = None, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    hidden = {"docs_url": None, "redoc_url": None, "openapi_url": None} if api_key else {}  # the key guards all
    app = FastAPI(title="lemoe", description="A lifelong-edited model: OpenAI-compatible completions and live edits.",
                  **hidden)
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(where) or None
        message = first.get("msg", "invalid request")
        text = f"field {param!r}: {message}" if param else f"request body: {message}"
        return _error(400, text, param)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return _error(err.status, err.message, err.param, err.kind)

    def authorised(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", kind="authentication_error")

    def writable() -> None:
        if served.read_only:
            raise ApiError(403, "this server follows another writer's adapter (--follow): edits go to the writer",
                           kind="permission_error")

    def check_sampling(body: Sampling) -> None:
        if body.max_tokens > limits.max_tokens:
            raise ApiError(400, f"field 'max_tokens': at most {limits.max_tokens}", "max_tokens")
        if body.model not in (None, served.name):
            raise ApiError(404, f"model {body.model!r} is not served here (this server serves {served.name!r})",
                           "model", "not_found_error")

    # ------------------------------------------------------------------ read-only endpoints

    @app.get("/health", dependencies=[Depends(authorised)])
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": served.name, "experts": served.editor.num_experts,
                "edits": len(served.editor.edits), "read_only": served.read_only, "adapter": str(served.adapter_dir)}

    @app.get("/v1/models", dependencies=[Depends(authorised)])
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": served.created,
                                            "owned_by": "lemoe"}]}

    # ------------------------------------------------------------------ generation

    @app.post("/v1/completions", dependencies=[Depends(authorised)], response_model=None)
    def completions(body: CompletionRequest) -> Any:
        check_sampling(body)
        prompts = body.prompts()
        if len(prompts) > limits.max_prompts:
            raise ApiError(400, f"field 'prompt': at most {limits.max_prompts} prompts", "prompt")
        ids = [served.prompt_ids(p) for p in prompts]
        if body.stream:
            if len(ids) != 1:
                raise ApiError(400, "field 'stream': one prompt per streamed request", "stream")
            return _stream(served, ids[0], body, "text_completion", chat=False)
        done = [_complete(served, i, body) for i in ids]
        choices = [{"index": k, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason,
                    EXPERT_FIELD: c.expert} for k, c in enumerate(done)]
        return _response("text_completion", "cmpl", served.name, choices, done)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorised)], response_model=None)
    def chat_completions(body: ChatRequest) -> Any:
        check_sampling(body)
        try:
            ids = served.chat_ids([m.model_dump() for m in body.messages])
        except ValueError as err:
            raise ApiError(400, str(err), "messages") from None
        if body.stream:
            return _stream(served, ids, body, "chat.completion.chunk", chat=True)
        done = _complete(served, ids, body)
        choices = [{"index": 0, "message": {"role": "assistant", "content": done.text},
                    "finish_reason": done.finish_reason, EXPERT_FIELD: done.expert}]
        return _response("chat.completion", "chatcmpl", served.name, choices, [done])

    # ------------------------------------------------------------------ editing

    @app.post("/v1/edits", dependencies=[Depends(authorised), Depends(writable)])
    def add_edits(body: EditBatch) -> dict[str, Any]:
        if len(body.edits) > limits.max_edits:
            raise ApiError(400, f"field 'edits': at most {limits.max_edits} edits per batch", "edits")
        try:
            records = body.records()
        except ValueError as err:
            raise ApiError(400, str(err), "edits") from None
        try:
            return served.edit(records)
        except (DataError, ValueError) as err:
            raise ApiError(400, str(err), "edits") from None
        except (AdapterError, OSError) as err:
            raise ApiError(500, f"the edit was not saved, and is not served: {err}", kind="server_error") from None

    @app.get("/v1/edits", dependencies=[Depends(authorised)])
    def list_edits(offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
        page, total = served.edits(offset, limit)
        return {"object": "list", "data": page, "offset": offset, "limit": limit, "total": total}

    @app.post("/v1/edits/rollback", dependencies=[Depends(authorised), Depends(writable)])
    def rollback(body: Rollback) -> dict[str, Any]:
        try:
            return served.rollback(body.batches)
        except ValueError as err:
            raise ApiError(400, str(err), "batches") from None
        except (AdapterError, OSError) as err:
            raise ApiError(500, f"the rollback was not saved, and nothing was removed: {err}",
                           kind="server_error") from None

    return app


def _complete(served: ServedModel, ids: list[int], body: Sampling) -> Completion:
    try:
        return served.complete(ids, body.max_tokens, body.temperature, body.top_p, body.stops(), body.seed)
    except ValueError as err:
        raise ApiError(400, str(err), "max_tokens") from None


def _response(kind: str, prefix: str, model: str, choices: list[dict[str, Any]], done: list[Completion]
              ) -> dict[str, Any]:
    prompt_tokens = sum(c.prompt_tokens for c in done)
    completion_tokens = sum(c.completion_tokens for c in done)
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model,
            "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                          "total_tokens": prompt_tokens + completion_tokens}}


def _stream(served: ServedModel, ids: list[int], body: Sampling, kind: str, chat: bool) -> StreamingResponse:
    """Server-sent events: one chunk per decoded piece, then the finish reason, then [DONE]."""
    from transformers import TextIteratorStreamer

    served.check_length(ids, body.max_tokens)
    streamer = TextIteratorStreamer(served.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    decided = threading.Event()
    result: dict[str, Any] = {}

    def run() -> None:
        def note(expert: int | None) -> None:
            result["expert"] = expert
            decided.set()

        try:
            result["done"] = served.complete(ids, body.max_tokens, body.temperature, body.top_p, body.stops(),
                                             body.seed, streamer=streamer, on_expert=note)
        except Exception as err:  # reported in the stream; the streamer must still end
            result["error"] = str(err)
            decided.set()
            streamer.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())

    def chunk(piece: str | None, finish: str | None) -> str:
        if chat:
            delta = {"content": piece} if piece is not None else {}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
        choice[EXPERT_FIELD] = result.get("expert")
        return "data: " + json.dumps({"id": ident, "object": kind, "created": created, "model": served.name,
                                      "choices": [choice]}) + "\n\n"

    def events() -> Iterator[str]:
        decided.wait()
        if chat:
            yield chunk(None, None).replace('"delta": {}', '"delta": {"role": "assistant"}')
        sent = ""
        stops = body.stops()
        for piece in stream_pieces(streamer):
            text = sent + piece
            cut = [text.index(s) for s in stops if s in text]
            if cut:  # never send a stop string, nor anything after it
                if min(cut) > len(sent):
                    yield chunk(text[len(sent) : min(cut)], None)
                sent = text[: min(cut)]
                break
            yield chunk(piece, None)
            sent = text
        worker.join()
        if "error" in result:
            yield "data: " + json.dumps({"error": {"message": result["error"], "type": "server_error"}}) + "\n\n"
        else:
            yield chunk(None, result["done"].finish_reason)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
