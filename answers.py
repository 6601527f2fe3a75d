"""How the server answers: a Job hands one request to the engine and reads its events back on the event loop;
`chat_completion`, `chat_chunks`, `record` and `record_pieces` turn them into OpenAI's response, its streamed chunks,
and the command line's `--output_format json` record (whole, or streamed for the web page); `events` sends a stream
as Server-Sent Events. Text is given as the command line streams it (generate.TextStream: whole characters only,
so the joined stream is the final text), cut at the request's stop strings.
"""

import asyncio
import json
import secrets
import time
import traceback

from starlette.datastructures import UploadFile

from paligemma.chat import ApiError, Chat, StopStrings, chunk, token_logprob, usage
from paligemma.console import UserError, log, peak_rss_gib
from paligemma.engine import Closed, QueueFull, Request
from paligemma.flags import FLAG_RULES
from paligemma.generate import TextStream

# The fields of POST /v1/paligemma: the command line's decoding options, with its defaults.
# stream: true answers in Server-Sent Events, the text as it grows then the record (the web page reads it so).
FORM_FIELDS = {"prompt": "caption en", "max_tokens_to_generate": 100, "do_sample": False, "temperature": 0.8,
               "top_p": 0.9, "seed": None, "min_score": 0.0, "stream": False}
BOOLEANS = {"true": True, "false": False, "1": True, "0": False}


class Job:
    """One request in the engine, and its events as they come back."""

    def __init__(self, state, inputs: dict, max_tokens: int, temperature: float, top_p: float, seed: int | None,
                 top_logprobs: int, received: float):
        loop, self.events = asyncio.get_running_loop(), asyncio.Queue()
        self.state, self.received, self.prompt_tokens = state, received, inputs["input_ids"].shape[1]
        self.ids, self.tokens = [], []

        def on_event(kind, value):  # on the engine's thread
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
            except RuntimeError:  # the event loop is gone: nobody is waiting for this answer
                pass

        self.request = Request(inputs, max_tokens, temperature, top_p, seed, top_logprobs, on_event)
        try:
            state.engine.submit(self.request)
        except QueueFull:
            raise ApiError(503, f"the server is busy: {state.engine.max_queue} requests are waiting already; try "
                                "again shortly", code="queue_full", headers={"Retry-After": "2"}) from None
        except Closed:
            raise ApiError(503, "the server is shutting down") from None

    def cancel(self):
        self.request.cancelled = True

    async def next(self) -> tuple[str, object]:
        """The next event: ("token", Token) or ("done", reason); an error becomes an ApiError."""
        kind, value = await self.events.get()
        if kind == "token":
            self.ids.append(value.id)
            self.tokens.append(value)
        elif kind == "error":
            raise self.failure(value)
        else:
            times = self.request.times
            if "first_token" in times:
                self.state.ttft.observe(times["first_token"] - self.received)
                if len(self.ids) > 1 and times["finished"] > times["first_token"]:
                    self.state.rate.observe((len(self.ids) - 1) / (times["finished"] - times["first_token"]))
        return kind, value

    def failure(self, e: BaseException) -> ApiError:
        if isinstance(e, Closed):
            return ApiError(503, str(e))
        if isinstance(e, UserError):  # the model overflowed its dtype, say
            return ApiError(500, str(e))
        incident = secrets.token_hex(6)
        log(f"error {incident} while answering:\n{''.join(traceback.format_exception(e)).rstrip()}")
        return ApiError(500, f"internal error {incident} (the server's log has the details)")

    async def watched(self, http_request, work):
        """The result of work (a coroutine that reads this job), the row cancelled if the client leaves first."""

        async def watch():
            while (await http_request.receive())["type"] != "http.disconnect":
                pass
            self.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            return await work
        finally:
            watcher.cancel()
            self.cancel()  # a no-op once the answer is complete

    async def pieces(self, stops: StopStrings):
        """(new text, the tokens since the last piece, finish reason or None), until the answer ends."""
        tokenizer, pending, sent = self.state.session.tokenizer, [], ""
        text = TextStream(tokenizer)
        while True:
            kind, value = await self.next()
            if kind == "token":
                pending.append(value)
                text.add(self.ids)
                shown, hit = stops.cut(text.shown, final=False)
                finish = "stop" if hit else None
            else:
                shown, hit = stops.cut(tokenizer.decode(self.ids, skip_special_tokens=True), final=True)
                finish = "stop" if hit or value == "stop" else "length"
            if hit:
                self.cancel()
            if len(shown) > len(sent) or finish:
                yield shown[len(sent):], pending, finish
                sent, pending = shown, []
            if finish:
                return


def objects(state, job: Job, text: str | None, prompt: str, image, min_score: float = 0.0) -> dict:
    """The answer's record as the command line writes it: text (the ids decoded, unless given), token_ids, logprobs
    and, for detect and segment prompts, the objects found."""
    return state.session.record(job.ids, [t.logprob for t in job.tokens], image, prompt, min_score, text=text)


def found(record: dict) -> dict:
    return {key: record[key] for key in ("detections", "segments") if key in record}


async def chat_completion(state, job: Job, chat: Chat, image) -> dict:
    content, finish = "", None
    async for piece, _, end in job.pieces(StopStrings(chat.stop)):
        content, finish = content + piece, end
    record = await asyncio.to_thread(objects, state, job, content, chat.prompt, image)
    logprobs = {"content": [token_logprob(state.session.tokenizer, t) for t in job.tokens]} if chat.logprobs else None
    return {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion", "created": int(time.time()),
            "model": state.name, "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                              "logprobs": logprobs, "finish_reason": finish}],
            "usage": usage(job.prompt_tokens, len(job.ids)), **found(record)}


async def events(job: Job, messages):
    """Server-Sent Events of messages (an async generator of dicts), an error as OpenAI's error body, then [DONE].
    The row is cancelled however the stream ends."""
    try:
        async for message in messages:
            yield f"data: {json.dumps(message, ensure_ascii=False)}\n\n"
    except Exception as e:  # the headers are sent: the error goes in the stream, a 500's logged with its id
        yield f"data: {json.dumps((e if isinstance(e, ApiError) else job.failure(e)).body())}\n\n"
    finally:
        job.cancel()
    yield "data: [DONE]\n\n"


async def chat_chunks(state, job: Job, chat: Chat, image):
    """OpenAI's chunks: the role first, then the text as it grows, finish_reason (and any objects found) in the
    last choice chunk, then the usage if asked for."""
    base = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": state.name}
    content = ""
    yield chunk(base, {"role": "assistant", "content": ""})
    async for piece, tokens, finish in job.pieces(StopStrings(chat.stop)):
        content += piece
        logprobs = [token_logprob(state.session.tokenizer, t) for t in tokens] if chat.logprobs else None
        if piece or logprobs:
            yield chunk(base, {"content": piece}, logprobs=logprobs)
        if finish:
            record = await asyncio.to_thread(objects, state, job, content, chat.prompt, image)
            yield {**chunk(base, {}, finish), **found(record)}
    if chat.include_usage:
        yield {**base, "object": "chat.completion.chunk", "choices": [],
               "usage": usage(job.prompt_tokens, len(job.ids))}


async def record(state, job: Job, fields: dict, image) -> dict:
    """The command line's --output_format json record for this image, timings included."""
    while (await job.next())[0] != "done":
        pass
    return await finished_record(state, job, fields, image)


async def record_pieces(state, job: Job, fields: dict, image):
    """The record's text as it grows ({"text": piece}, whole characters), then the record itself ({"record": ...})."""
    async for piece, _, finish in job.pieces(StopStrings([])):
        if piece:
            yield {"text": piece}
        if finish:
            break
    yield {"record": await finished_record(state, job, fields, image)}


async def finished_record(state, job: Job, fields: dict, image) -> dict:
    answer = await asyncio.to_thread(objects, state, job, None, fields["prompt"], image, fields["min_score"])
    times = job.request.times
    first = times.get("first_token", times["finished"])
    timings = {"load_s": state.load_s, "first_token_s": first - job.received, "decode_s": times["finished"] - first,
               "decode_tokens": max(len(job.ids) - 1, 0), "peak_rss_gib": peak_rss_gib(),
               "queue_s": times.get("started", times["finished"]) - times["queued"]}
    return {**answer, "timings": timings}


async def read_form(request) -> tuple[bytes, dict]:
    """POST /v1/paligemma's multipart form: the image's bytes, and the fields checked by the command line's rules."""
    try:
        form = await request.form(max_files=1, max_fields=len(FORM_FIELDS) + 1)
    except Exception as e:  # not multipart, malformed, too many parts: starlette's words say which
        raise ApiError(400, f"the body must be a multipart form with an image file ({e})"[:300]) from None
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise ApiError(400, "no image: send it as a file field named image (curl -F image=@cat.jpg)", "image")
    fields = dict(FORM_FIELDS)
    for name, value in form.multi_items():
        if name == "image":
            continue
        if name not in FORM_FIELDS or not isinstance(value, str):
            raise ApiError(400, f"unknown field {name[:40]!r}; the fields are image, {', '.join(FORM_FIELDS)}",
                           name[:40])
        fields[name] = parse_field(name, value)
    return await upload.read(), fields


def parse_field(name: str, value: str):
    default = FORM_FIELDS[name]
    try:
        if name == "prompt":
            return value
        if isinstance(default, bool):
            parsed = BOOLEANS[value.strip().lower()]
        elif name in ("max_tokens_to_generate", "seed"):
            parsed = int(value)
        else:
            parsed = float(value)
    except (KeyError, ValueError):
        parsed = value
    valid, what = FLAG_RULES[name]
    if not valid(parsed):
        raise ApiError(400, f"{name} must be {what}, not {value[:40]!r}", name)
    return parsed
