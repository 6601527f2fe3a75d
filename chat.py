"""OpenAI's chat-completions shape as this server takes and answers it: `parse_chat` turns a request body into what
the engine needs, or an ApiError naming what is wrong; the rest builds response, chunk and error bodies.

PaliGemma answers one task prompt about one image, so a request is one user message whose content is one image part
and one text part. What the model cannot do (a system message, several turns or images, tools, n > 1) is refused
by name rather than ignored.
"""

import re
from dataclasses import dataclass

from paligemma.engine import Token
from paligemma.flags import FLAG_RULES

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
               503: "service_unavailable"}
MAX_TOP_LOGPROBS = 20
UNSUPPORTED = {"tools": "tools", "tool_choice": "tools", "functions": "functions", "function_call": "functions",
               "audio": "audio", "prediction": "predicted outputs"}


class ApiError(Exception):
    """An answer with an error status, in OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


@dataclass
class Chat:
    """A chat request, checked: the image's URL, the task prompt and how to decode."""

    image_url: str
    prompt: str
    max_tokens: int | None  # None: as many as the positions and the server's default allow
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int


def check(body: dict, name: str, valid, what: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    if not valid(value):
        raise ApiError(400, f"{name} must be {what}, not {value!r}"[:300], param=name)
    return value


def parse_chat(body, model: str) -> Chat:
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    if body.get("model") not in (None, model):
        raise ApiError(404, f"the model {str(body['model'])[:100]!r} does not exist; this server serves {model!r}",
                       param="model", code="model_not_found")
    for name, what in UNSUPPORTED.items():
        if body.get(name) not in (None, [], {}):
            raise ApiError(400, f"{what} are not supported: PaliGemma answers a task prompt about an image", name)
    n = check(body, "n", lambda v: type(v) is int and v >= 1, "a whole number >= 1", 1)
    if n > 1:
        raise ApiError(400, "n > 1 is not supported: ask once per answer", param="n")
    for name in ("frequency_penalty", "presence_penalty"):
        check(body, name, lambda v: v == 0, "0 (penalties are not supported)")
    image_url, prompt = parse_messages(body.get("messages"))
    max_tokens = check(body, "max_completion_tokens", lambda v: type(v) is int and v >= 1, "a whole number >= 1",
                       check(body, "max_tokens", lambda v: type(v) is int and v >= 1, "a whole number >= 1"))
    stop = check(body, "stop", lambda v: isinstance(v, str) or isinstance(v, list) and len(v) <= 4 and all(
        isinstance(s, str) for s in v), "a string or a list of at most 4 strings", [])
    stream = check(body, "stream", lambda v: isinstance(v, bool), "true or false", False)
    options = check(body, "stream_options", lambda v: isinstance(v, dict) and isinstance(
        v.get("include_usage", False), bool), 'an object like {"include_usage": true}', {})
    if options and not stream:
        raise ApiError(400, "stream_options goes with stream: true", param="stream_options")
    logprobs = check(body, "logprobs", lambda v: isinstance(v, bool), "true or false", False)
    top = check(body, "top_logprobs", lambda v: type(v) is int and 0 <= v <= MAX_TOP_LOGPROBS,
                f"a whole number from 0 to {MAX_TOP_LOGPROBS}", 0)
    if top and not logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return Chat(image_url, prompt, max_tokens, temperature=flag(body, "temperature", 0.0),
                top_p=flag(body, "top_p", 1.0), seed=flag(body, "seed", None),
                stop=[s for s in ([stop] if isinstance(stop, str) else stop) if s], stream=stream,
                include_usage=bool(options.get("include_usage")), logprobs=logprobs, top_logprobs=top)


def flag(body: dict, name: str, default):
    """A decoding parameter, checked by the command line's own rule for its flag."""
    valid, what = FLAG_RULES[name]
    return check(body, name, lambda v: not isinstance(v, bool) and valid(v), what, default)


def parse_messages(messages) -> tuple[str, str]:
    """The image URL and the prompt of the one user message."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a list with one user message", param="messages")
    if not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "every message must be a JSON object", param="messages")
    roles = [m.get("role") for m in messages]
    if "system" in roles or "developer" in roles:
        raise ApiError(400, "system messages are not supported: PaliGemma takes one image and a task prompt "
                            "(caption en, detect cat, ...)", param="messages")
    if len(messages) > 1:
        raise ApiError(400, f"{len(messages)} messages: several turns are not supported; send one user message "
                            "with one image and one prompt", param="messages")
    if roles[0] != "user":
        raise ApiError(400, f"the message's role is {roles[0]!r}; it must be 'user'", param="messages")
    content = messages[0].get("content")
    parts = [content] if isinstance(content, str) else content
    if not isinstance(parts, list) or not all(isinstance(p, (dict, str)) for p in parts):
        raise ApiError(400, "the message's content must be a list of parts", param="messages")
    parts = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    kinds = [p.get("type") for p in parts]
    unknown = sorted({str(k) for k in kinds} - {"text", "image_url"})
    if unknown:
        raise ApiError(400, f"content parts of type {', '.join(unknown)} are not supported (text and image_url)",
                       param="messages")
    if kinds.count("image_url") != 1:
        raise ApiError(400, "no image: the message needs one image_url part" if "image_url" not in kinds else
                       f"{kinds.count('image_url')} images: PaliGemma takes one", param="messages")
    if kinds.count("text") != 1:
        raise ApiError(400, "the message needs one text part, the task prompt (caption en, detect cat, ...)"
                       if "text" not in kinds else "several text parts: send one task prompt", param="messages")
    image, text = parts[kinds.index("image_url")].get("image_url"), parts[kinds.index("text")].get("text")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise ApiError(400, 'the image part must be {"type": "image_url", "image_url": {"url": "data:..."}}',
                       param="messages")
    if not isinstance(text, str) or not text.strip():
        raise ApiError(400, "the text part must be a non-empty task prompt", param="messages")
    return url, text


class StopStrings:
    """Cut an answer at the first of the stop strings; while it grows, hold back an ending that may begin one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pattern = re.compile("|".join(map(re.escape, stops))) if stops else None

    def cut(self, text: str, final: bool) -> tuple[str, bool]:
        """(the text that may be shown, whether a stop string ended it)."""
        found = self.pattern.search(text) if self.pattern else None
        if found:
            return text[:found.start()], True
        if final or not self.stops:
            return text, False
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return text[:len(text) - hold], False


def token_logprob(tokenizer, token: Token) -> dict:
    """One token's entry in OpenAI's logprobs.content."""

    def entry(token_id: int, logprob: float) -> dict:
        piece = tokenizer.convert_ids_to_tokens(token_id)
        byte = re.fullmatch(r"<0x([0-9A-F]{2})>", piece or "")
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": [int(byte[1], 16)] if byte else list(text.encode())}

    return {**entry(token.id, token.logprob), "top_logprobs": [entry(i, lp) for i, lp in token.top]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chunk(base: dict, delta: dict, finish: str | None = None, logprobs: list | None = None) -> dict:
    choice = {"index": 0, "delta": delta, "logprobs": None if logprobs is None else {"content": logprobs},
              "finish_reason": finish}
    return {**base, "object": "chat.completion.chunk", "choices": [choice]}
