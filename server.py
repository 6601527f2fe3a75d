"""An OpenAI-compatible HTTP server for PaliGemma, with a web page at /: `python server.py --model_path DIR`.

It listens at once and loads the model in the background (GET /health answers 503 until it is ready); engine.py then
answers every request, decoding the running ones together. This file is the HTTP layer: flags, routes, errors in
OpenAI's shape, streaming and metrics. The guard in front of the routes (Host header, API key, body size) is in
guard.py, chat requests are parsed in chat.py, image URLs read in media.py. Safe by default: loopback only, no remote
images, no CORS.
"""

import asyncio
import inspect
import io
import json
import os
import secrets
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

import fire
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from paligemma import answers, masks
from paligemma.batch import check_fits, check_prompt
from paligemma.chat import ApiError, parse_chat
from paligemma.checkpoint import DTYPES, find_shards, load_config, model_folder, read_safetensors_header, stop_tokens
from paligemma.console import UserError, kind_of, log, require_file
from paligemma.engine import Engine
from paligemma.flags import FLAG_RULES, check_flag_names, check_flags, quote_string_flags
from paligemma.generate import choose_device, load_session
from paligemma.guard import Guard, error_response
from paligemma.inference import failure
from paligemma.media import MediaError, read_media
from paligemma.processing_paligemma import DEFAULT_MAX_PIXELS, check_tokenizer, decode_image

SERVER_RULES = {
    **{name: FLAG_RULES[name] for name in ("dtype", "quantize", "max_image_pixels", "only_cpu", "ignore_memory_check")},
    "port": (lambda v: type(v) is int and 0 <= v <= 65535, "a port number from 0 to 65535"),
    "host": (lambda v: isinstance(v, str) and v != "", "an address to listen on"),
    # Up to 16 rows a step runs kernels.gemv, which computes each row as it would alone (batch invariance).
    "max_batch": (lambda v: type(v) is int and 1 <= v <= 16, "a whole number from 1 to 16"),
    "max_queue": (lambda v: type(v) is int and v >= 1, "a whole number >= 1"),
    "max_tokens": (lambda v: type(v) is int and v >= 1, "a whole number >= 1"),
    "max_body_bytes": (lambda v: type(v) is int and v >= 1024, "a whole number >= 1024"),
    "shutdown_timeout": (lambda v: type(v) in (int, float) and v >= 0, "a number of seconds >= 0"),
    **{name: (lambda v: v is None or isinstance(v, str) and v.strip() != "", "a non-empty text")
       for name in ("api_key", "served_model_name", "cors_origins", "allowed_media_domains", "vae_path",
                    "allowed_local_media_path")},
}
STRING_FLAGS = ("model_path", "host", "dtype", "quantize", "vae_path", "api_key", "served_model_name", "cors_origins",
                "allowed_media_domains", "allowed_local_media_path")
SHUTDOWN_MARGIN_S = 10  # past --shutdown_timeout: for the step in progress and the cut answers' last events
disable_created_metrics()  # one series per metric, not a second one of creation times


class State:
    """What the routes share: the flags, the loaded session and its engine (None while loading), the metrics."""

    def __init__(self, flags: dict, folder: Path, vae):
        self.flags, self.folder, self.vae = flags, folder, vae
        self.name = flags["served_model_name"]
        self.session, self.engine, self.failed, self.load_s, self.created = None, None, None, 0.0, int(time.time())
        self.domains = frozenset(d.strip().lower() for d in (flags["allowed_media_domains"] or "").split(",")
                                 if d.strip())
        local = flags["allowed_local_media_path"]
        self.local_root = Path(local).resolve() if local else None
        self.registry = CollectorRegistry()
        self.requests = Counter("paligemma_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=self.registry)
        Gauge("paligemma_queue_length", "requests waiting for a row", registry=self.registry).set_function(
            lambda: len(self.engine.queue) if self.engine else 0)
        Gauge("paligemma_running_rows", "requests decoding", registry=self.registry).set_function(
            lambda: len(self.engine.rows) if self.engine else 0)
        self.ttft = Histogram("paligemma_time_to_first_token_seconds", "from a request's arrival to its first token",
                              buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.rate = Histogram("paligemma_decode_tokens_per_second", "a request's decode speed",
                              buckets=(0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)

    def load(self):
        """Load the model, then run the engine on this thread (one of its own, while the server already answers)."""
        start = time.monotonic()
        device, note = choose_device(self.flags["only_cpu"])
        if note:
            log(note)
        quantize = None if self.flags["quantize"] == "none" else self.flags["quantize"]
        self.session = load_session(self.folder, device, DTYPES.get(self.flags["dtype"]), vae=self.vae,
                                    memory_check=not self.flags["ignore_memory_check"], quantize=quantize,
                                    batch=self.flags["max_batch"])
        engine = Engine(self.session, self.flags["max_batch"], self.flags["max_queue"])
        self.load_s = time.monotonic() - start
        log(f"ready: {self.name} loaded in {self.load_s:.1f} s")
        self.engine = engine
        engine.serve()  # on this thread, which loaded the model (Engine.serve says why), until the server stops

    def ready(self):
        if self.engine is None:
            raise ApiError(503, "Loading model", code="model_loading", headers={"Retry-After": "5"})

    def image(self, url: str | None = None, data: bytes | None = None):
        """A request's image, decoded (on a worker thread: never on the event loop)."""
        try:
            if url is not None:
                data = read_media(url, max_bytes=self.flags["max_body_bytes"], domains=self.domains,
                                  local_root=self.local_root)
            return decode_image(io.BytesIO(data), "the image", self.flags["max_image_pixels"])
        except (MediaError, UserError) as e:
            raise ApiError(400, str(e), param="image") from None

    def inputs(self, prompt: str, image, max_tokens: int | None) -> tuple[dict, int]:
        """The processor's tensors for the prompt and image, and the token budget that fits the positions."""
        try:
            check_prompt(prompt)
            inputs = self.session.processor([prompt], [image])
            length, config = inputs["input_ids"].shape[1], self.session.model.config
            positions = config.text_config.max_position_embeddings
            budget = max_tokens if max_tokens is not None else min(self.flags["max_tokens"], positions - length)
            check_fits(length, budget, positions, config.num_image_tokens)
        except UserError as e:
            raise ApiError(400, str(e).replace("--max_tokens_to_generate", "max_tokens"), param="messages") from None
        return inputs, budget


ROUTES = ("/v1/chat/completions", "/v1/paligemma", "/v1/models", "/health", "/metrics")
# The web page (web/): files anyone who reaches the server may read, as /health; what they call needs the key.
WEB = Path(__file__).resolve().parent / "web"
PAGE = {"/": ("index.html", "text/html"), "/app.js": ("app.js", "text/javascript"),
        "/style.css": ("style.css", "text/css")}
PUBLIC = ("/health", *PAGE)
# The page may load and call nothing but this server: no inline script or style, no other origin, no frames.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                "img-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                "frame-ancestors 'none'", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-cache"}


def page_route(name: str, media_type: str):
    async def page_file():
        return Response((WEB / name).read_bytes(), media_type=f"{media_type}; charset=utf-8", headers=PAGE_HEADERS)

    return page_file


def create_app(state: State) -> FastAPI:
    """The routes, the error handlers and the guard; the model loads when the app starts."""

    async def lifespan(app):
        loading = asyncio.get_running_loop().run_in_executor(None, load_or_fail, state)
        yield
        if state.engine is not None:
            await run_in_threadpool(state.engine.stop, 0)
        elif not loading.done():
            os._exit(0)  # stopped while loading: nothing to finish

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        message = {404: f"no route {request.method} {request.url.path}", 405: f"{request.method} is not allowed on "
                   f"{request.url.path}"}.get(e.status_code, str(e.detail))
        return error_response(ApiError(e.status_code, message, headers=getattr(e, "headers", None)))

    @app.exception_handler(Exception)
    async def unexpected(request, e: Exception):
        incident = secrets.token_hex(6)
        log(f"error {incident} on {request.method} {request.url.path}:\n{traceback.format_exc().rstrip()}")
        return error_response(ApiError(500, f"internal error {incident} (the server's log has the details)"))

    @app.get("/health")
    async def health():
        state.ready()
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.name, "object": "model", "created": state.created,
                                            "owned_by": "pytorch-paligemma"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(state.registry), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        received = time.monotonic()
        state.ready()
        chat = parse_chat(await read_json(request), state.name)
        image = await run_in_threadpool(state.image, chat.image_url)
        inputs, budget = await run_in_threadpool(state.inputs, chat.prompt, image, chat.max_tokens)
        job = answers.Job(state, inputs, budget, chat.temperature, chat.top_p, chat.seed, chat.top_logprobs,
                          received)
        if chat.stream:
            return StreamingResponse(answers.events(job, answers.chat_chunks(state, job, chat, image)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await job.watched(request, answers.chat_completion(state, job, chat, image))

    @app.post("/v1/paligemma")
    async def paligemma(request: Request):
        received = time.monotonic()
        state.ready()
        upload, fields = await answers.read_form(request)
        image = await run_in_threadpool(state.image, None, upload)
        inputs, budget = await run_in_threadpool(state.inputs, fields["prompt"], image,
                                                 fields["max_tokens_to_generate"])
        job = answers.Job(state, inputs, budget, fields["temperature"] if fields["do_sample"] else 0.0,
                          fields["top_p"], fields["seed"], 0, received)
        if fields["stream"]:
            return StreamingResponse(answers.events(job, answers.record_pieces(state, job, fields, image)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await job.watched(request, answers.record(state, job, fields, image))

    for path, (name, media_type) in PAGE.items():  # a route each, taking no parameter: no request picks the file
        app.get(path)(page_route(name, media_type))

    guarded = Guard(app, state, ROUTES, PUBLIC)
    return CORSMiddleware(guarded, allow_origins=state.flags["cors_origins"].split(","),
                          allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"]) \
        if state.flags["cors_origins"] else guarded


async def read_json(request: Request):
    try:
        return json.loads(await request.body())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ApiError(400, f"the body is not valid JSON ({getattr(e, 'msg', type(e).__name__)})") from None


def load_or_fail(state: State):
    try:
        state.load()
    except BaseException as e:  # the one line the command line would print; the server exits with it
        state.failed = failure(e, bool(os.environ.get("PALIGEMMA_DEBUG")))
        log(state.failed[0])
        os.kill(os.getpid(), signal.SIGTERM)


class Server(uvicorn.Server):
    """uvicorn's server, whose shutdown (SIGTERM, Ctrl-C) first closes the engine (Engine.close): waiting requests get
    503, running ones --shutdown_timeout seconds, inside uvicorn's own, longer wait for open connections."""

    def __init__(self, state: State, config: uvicorn.Config):
        super().__init__(config)
        self.state = state

    async def shutdown(self, sockets=None):
        if self.state.engine is not None:
            self.state.engine.close(self.state.flags["shutdown_timeout"])
        await super().shutdown(sockets)


def main(model_path: str, port: int = 8000, host: str = "127.0.0.1", dtype: str | None = None,
         quantize: str = "none", only_cpu: bool = False, vae_path: str | None = None,
         max_image_pixels: int = DEFAULT_MAX_PIXELS, ignore_memory_check: bool = False, api_key: str | None = None,
         max_batch: int = 4, max_queue: int = 32, served_model_name: str | None = None,
         shutdown_timeout: float = 30.0, cors_origins: str | None = None, allowed_media_domains: str | None = None,
         allowed_local_media_path: str | None = None, max_tokens: int = 100, max_body_bytes: int = 32 << 20):
    """Serve a PaliGemma checkpoint over HTTP with OpenAI's chat completions API.

    Args:
        model_path: the checkpoint folder or a Hub id in the local cache, as for inference.py
        port: the TCP port to listen on
        host: the address to listen on; 127.0.0.1 (this machine only) unless you mean otherwise
        dtype, quantize, only_cpu, vae_path, max_image_pixels, ignore_memory_check: as for inference.py
        api_key: require Authorization: Bearer API_KEY on every route but /health and the web page's files
        max_batch: requests decoded together (1 to 16)
        max_queue: requests waiting beyond those; more get 503 with Retry-After
        served_model_name: the model's name in the API (default: the Hub id, or the folder's name)
        shutdown_timeout: seconds that running answers get to finish on SIGTERM or Ctrl-C (waiting ones get 503);
            the server exits within 10 s more
        cors_origins: comma-separated origins that browsers may call from (none by default)
        allowed_media_domains: comma-separated hosts whose https:// images may be fetched (none by default)
        allowed_local_media_path: a folder whose files file:// image URLs may name (none by default)
        max_tokens: the answer's length when a request does not say
        max_body_bytes: the largest request body
    """
    flags = dict(locals())
    check_flags(flags, SERVER_RULES)
    folder = model_folder(model_path)
    if served_model_name is None:  # the Hub id as given, or the folder's name
        flags["served_model_name"] = model_path.split("@")[0] if folder != Path(model_path) else folder.resolve().name
    config = load_config(folder)
    stop_tokens(folder, config)
    check_tokenizer(folder, config)
    for shard in find_shards(folder):
        read_safetensors_header(shard)
    if allowed_local_media_path is not None and kind_of(allowed_local_media_path) != "a folder":
        raise UserError(f"--allowed_local_media_path {allowed_local_media_path} is not a folder")
    if vae_path is not None:
        require_file(vae_path, "the --vae_path file")
    state = State(flags, folder, masks.load_vae(vae_path) if vae_path else None)
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn raises them again after its graceful shutdown: exit 0
        signal.signal(sig, lambda *_: None)
    log(f"listening on http://{host if ':' not in host else f'[{host}]'}:{sock.getsockname()[1]} (loading "
        f"{folder})")
    server = Server(state, uvicorn.Config(create_app(state), log_level="warning", lifespan="on",
                                          timeout_graceful_shutdown=shutdown_timeout + SHUTDOWN_MARGIN_S))
    server.run(sockets=[sock])
    if state.failed:
        sys.exit(state.failed[1])


def cli():
    debug = bool(os.environ.get("PALIGEMMA_DEBUG"))
    try:
        check_flag_names(sys.argv[1:], list(inspect.signature(main).parameters))
        fire.Fire(main, command=quote_string_flags(sys.argv[1:], STRING_FLAGS))
    except SystemExit:
        raise
    except BaseException as e:
        message, code = failure(e, debug)
        if debug:
            traceback.print_exc()
        log(message)
        sys.exit(code)


if __name__ == "__main__":
    cli()
