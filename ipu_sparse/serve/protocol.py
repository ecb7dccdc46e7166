"""The OpenAI HTTP API's request checks, response bodies and error shape (the subset we serve).

Errors are ``{"error": {"message", "type", "param", "code"}}`` with the status codes the
OpenAI API uses: 400 for a bad body or parameter (``context_length_exceeded`` when the
prompt and ``max_tokens`` do not fit), 404 for an unknown model or path, 503 when the
model's queue is full.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

MAX_STOP_STRINGS = 4
CHAT_ROLES = ("system", "user", "assistant")
# Parameters we do not implement: only these values (the defaults) are accepted.
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []), "functions": (None, []),
               "response_format": (None, {"type": "text"}), "echo": (None, False), "best_of": (None, 1),
               "suffix": (None, "")}

class ApiError(Exception):
    """An error answered in the OpenAI error shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_param(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


@dataclass
class GenerationRequest:
    """A checked chat or completions request."""

    kind: str  # "chat" or "completion"
    model: str
    messages: Optional[List[Dict[str, str]]] = None
    prompt: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def parse_json(raw: bytes) -> Dict[str, Any]:
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"We could not parse the JSON body of your request ({exc}). "
                            f"The body must be a JSON object.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad_param(name, f"'{name}' must be a number, got {json.dumps(v)}")
    v = float(v)
    if v != v or (v <= lo if lo_open else v < lo) or v > hi:
        rng = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise bad_param(name, f"'{name}' must be in {rng}, got {v}")
    return v


def _content(msg: Dict[str, Any], i: int) -> str:
    c = msg.get("content")
    if c is None and msg.get("role") == "assistant":
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # [{"type": "text", "text": "..."}]
        parts = []
        for part in c:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad_param(f"messages[{i}].content", f"messages[{i}].content: only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_param(f"messages[{i}].content", f"messages[{i}].content must be a string or a list of text parts")


def parse_generation(body: Dict[str, Any], kind: str) -> GenerationRequest:
    """Check a /v1/chat/completions (``kind="chat"``) or /v1/completions body."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required (a model id from GET /v1/models)", param="model",
                       code="missing_required_parameter")
    req = GenerationRequest(kind=kind, model=model)
    if kind == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages",
                           code="invalid_value" if "messages" in body else "missing_required_parameter")
        req.messages = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
                raise bad_param(f"messages[{i}].role", f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}")
            req.messages.append({"role": m["role"], "content": _content(m, i)})
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' must be a non-empty string", param="prompt",
                           code="invalid_value" if "prompt" in body else "missing_required_parameter")
        req.prompt = prompt
    for name in ("max_tokens", "max_completion_tokens"):
        v = body.get(name)
        if v is not None:
            if not _is_int(v) or v < 1:
                raise bad_param(name, f"'{name}' must be an integer >= 1, got {json.dumps(v)}")
            req.max_tokens = v
    req.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    req.top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise bad_param("seed", f"'seed' must be a non-negative integer, got {json.dumps(seed)}")
    req.seed = seed
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
                             or not all(isinstance(s, str) and s for s in stop)):
        raise bad_param("stop", f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them")
    req.stop = list(stop or [])
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_param("n", f"only n=1 is supported, got {json.dumps(n)}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad_param("stream", "'stream' must be true or false")
    req.stream = bool(stream)
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad_param("stream_options", "'stream_options' must be an object")
        req.include_usage = bool(opts.get("include_usage", False))
    for name, accepted in UNSUPPORTED.items():
        if name in body and body[name] not in accepted:
            raise ApiError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
    return req


def context_error(prompt_tokens: int, max_tokens: Optional[int], context: int) -> Optional[ApiError]:
    if prompt_tokens >= context:
        return ApiError(400, f"This model's maximum context length is {context} tokens. However, your prompt has "
                             f"{prompt_tokens} tokens. Please reduce the length of the messages or prompt.",
                        param="messages", code="context_length_exceeded")
    if max_tokens is not None and prompt_tokens + max_tokens > context:
        return ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                             f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for "
                             f"the completion). Please reduce the prompt or max_tokens.",
                        param="max_tokens", code="context_length_exceeded")
    return None


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> Dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def full_response(req: GenerationRequest, rid: str, model: str, result) -> Dict[str, Any]:
    created = int(time.time())
    finish = "stop" if result.finish_reason == "stop" else "length"
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                  "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
            "usage": usage(result.prompt_tokens, result.completion_tokens), "timings": result.timings()}


def chunk(req: GenerationRequest, rid: str, model: str, text: Optional[str] = None, role: bool = False,
          finish: Optional[str] = None) -> Dict[str, Any]:
    created = int(time.time())
    if req.kind == "chat":
        delta: Dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}


def usage_chunk(req: GenerationRequest, rid: str, model: str, result) -> Dict[str, Any]:
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(result.prompt_tokens, result.completion_tokens), "timings": result.timings()}


def sse(data: Any) -> bytes:
    return b"data: " + (data if isinstance(data, bytes) else json.dumps(data).encode("utf-8")) + b"\n\n"
