"""The server's engine: one thread that owns a loaded model (a generate.Session) and decodes every running request
in one step, continuous batching as vLLM and llama.cpp's server do it. No HTTP here: server.py is that layer.

A request's image and prompt run alone first, the vision tower and the prefill exactly as the command line runs
them, into the next free row of the KV caches; from the next step on, the row decodes beside the others, each at
its own cache position. A row's numbers are those it would have alone, whatever its neighbours: the products sum
each row by itself (kernels.gemv), attention reads only the row's own keys, and the rest is per row. A row that
finishes, is cancelled or fails leaves at once, and the last row moves into its place, so that the running rows
are always rows 0 .. n-1 of the caches. One newcomer is admitted between two steps, so that running streams keep
going while others join.
"""

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from paligemma.generate import NotFinite, Session, decode_one_token, pick, prefill
from paligemma.modeling_paligemma import CACHE_STEP


@dataclass
class Token:
    """One generated token: its id, its logprob, and the likeliest tokens' (id, logprob) at its step."""

    id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(eq=False)
class Request:
    """One image and prompt to answer, how to decode it, and where its events go.

    on_event(kind, value) is called on the engine's thread: ("token", Token) for each token, then one of ("done",
    "stop" | "length" | "cancelled") or ("error", the exception). It must return quickly (hand the event over)."""

    inputs: dict  # the processor's tensors for one image and its prompt
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    top_logprobs: int = 0
    on_event: Callable[[str, object], None] = lambda kind, value: None
    cancelled: bool = False  # set from any thread: the row leaves before the next step
    times: dict = field(default_factory=dict)  # time.monotonic() when "queued", "started", "first_token", "finished"


class QueueFull(Exception):
    """As many requests wait as the queue holds."""


class Closed(Exception):
    """The engine is shutting down and takes no more requests."""


@dataclass(eq=False)
class Row:
    """A running request: its sampler, the cache position its next token goes to, and that token."""

    request: Request
    generator: torch.Generator | None
    position: int
    token: int = 0
    count: int = 0  # tokens generated so far


class Engine:
    """Requests in, events out: a queue of at most max_queue waiting requests and at most max_batch running rows."""

    def __init__(self, session: Session, max_batch: int = 4, max_queue: int = 32):
        self.session, self.max_batch, self.max_queue = session, max_batch, max_queue
        self.vocab = len(session.tokenizer)  # logit columns from here on name no token: never chosen
        self.queue: collections.deque[Request] = collections.deque()
        self.rows: list[Row] = []
        self.changed = threading.Condition()
        self.accepting, self.deadline, self.ended = True, float("inf"), threading.Event()
        session.model.setup_caches(max_batch, CACHE_STEP)  # every row at once; lengths grow as prompts need

    def start(self) -> "Engine":
        """Run on a thread of its own (serve, below, runs on the caller's)."""
        threading.Thread(target=self.serve, name="engine", daemon=True).start()
        return self

    def submit(self, request: Request):
        """Queue a request; QueueFull or Closed where it cannot be."""
        with self.changed:
            if not self.accepting:
                raise Closed()
            if len(self.queue) >= self.max_queue:
                raise QueueFull()
            request.times["queued"] = time.monotonic()
            self.queue.append(request)
            self.changed.notify()

    def close(self, timeout: float):
        """Take no more requests: the waiting ones end with Closed, the running rows finish, or are cut with Closed
        after timeout seconds (from the first close). Returns at once."""
        with self.changed:
            if self.accepting:
                self.accepting, self.deadline = False, time.monotonic() + timeout
            self.changed.notify()

    def stop(self, timeout: float):
        """close(timeout), then wait until the engine has stopped serving."""
        self.close(timeout)
        self.ended.wait()

    def serve(self):
        """Answer requests on this thread until close(). Best on the thread that loaded the model: OpenMP keeps a
        pool of worker threads for each thread that runs parallel work, and with more workers than cores they sleep
        between the hundreds of parallel regions of a step instead of spinning, which cost the server 20 ms a step
        (int4, 2 cores) against the command line, where one thread does everything."""
        try:
            self.run()
        finally:
            self.ended.set()

    def run(self):
        with torch.inference_mode():
            while True:
                with self.changed:
                    while self.accepting and not self.queue and not self.rows:
                        self.changed.wait()
                    if not self.accepting:
                        while self.queue:
                            self.finish(self.queue.popleft(), "error", Closed("the server is shutting down"))
                        if self.rows and time.monotonic() >= self.deadline:
                            self.drop(range(len(self.rows)), "error", Closed("the server shut down before the answer "
                                                                             "was complete"))
                        if not self.rows:
                            return
                    admit = len(self.rows) < self.max_batch and self.queue
                    newcomer = self.queue.popleft() if admit else None
                if newcomer is not None:
                    self.admit(newcomer)
                self.drop([i for i, row in enumerate(self.rows) if row.request.cancelled], "done", "cancelled")
                if self.rows:
                    self.step()

    def admit(self, request: Request):
        """Run a request's image and prompt alone into the next row, and choose its first token."""
        if request.cancelled or request.max_tokens <= 0:
            return self.finish(request, "done", "cancelled" if request.cancelled else "length")
        request.times["started"] = time.monotonic()
        device = self.session.device
        inputs = {k: v.to(device) for k, v in request.inputs.items()}
        generator = torch.Generator(device).manual_seed(request.seed) if request.seed is not None else None
        row = Row(request, generator, position=inputs["input_ids"].shape[1])
        self.rows.append(row)
        try:
            logits = prefill(self.session.model, inputs, request.max_tokens, first_row=len(self.rows) - 1)
        except Exception as e:  # the row leaves; the engine and every other row go on
            return self.drop([len(self.rows) - 1], "error", e)
        self.choose([row], logits)

    def step(self):
        """One decode step of every running row, each at its own position, then each row's next token."""
        device = self.session.device
        tokens = torch.tensor([row.token for row in self.rows], device=device)
        positions = torch.tensor([[row.position] for row in self.rows], device=device)  # (B, 1)
        try:
            logits = decode_one_token(self.session.model, tokens, positions)
        except Exception as e:
            return self.drop(range(len(self.rows)), "error", e)
        for row in self.rows:
            row.position += 1
        self.choose(self.rows, logits)

    def choose(self, rows: list[Row], logits: torch.Tensor):
        """Each row's next token from its logits (one row each, in order), as the command line chooses it; the rows
        that end here leave."""
        ended = {}
        for i, row in enumerate(rows):
            request = row.request
            try:
                token, logprobs = pick(logits[i:i + 1], request.temperature, request.top_p, row.generator,
                                       self.vocab)
            except NotFinite:
                ended[i] = ("error", self.session.overflowed())
                continue
            row.token, row.count = int(token[0]), row.count + 1
            top = []
            if request.top_logprobs:
                values, ids = logprobs.top(request.top_logprobs, self.vocab)
                top = list(zip(ids[0].tolist(), values[0].tolist()))
            request.times.setdefault("first_token", time.monotonic())
            request.on_event("token", Token(row.token, float(logprobs.of(token[:, None])[0, 0]), top))
            if row.token in self.session.stop_ids:
                ended[i] = ("done", "stop")
            elif row.count >= request.max_tokens:
                ended[i] = ("done", "length")
        first = self.rows.index(rows[0])
        for i in sorted(ended, reverse=True):  # from the last, so that the rows moved into gaps are kept ones
            self.drop([first + i], *ended[i])

    def drop(self, indices, kind: str, value):
        """End the rows at these indices with (kind, value), moving the last rows into their places."""
        for i in sorted(indices, reverse=True):
            row, last = self.rows[i], len(self.rows) - 1
            if i != last:
                self.session.model.move_row(last, i)
                self.rows[i] = self.rows[last]
            self.rows.pop()
            self.finish(row.request, kind, value)

    @staticmethod
    def finish(request: Request, kind: str, value):
        request.times["finished"] = time.monotonic()
        request.on_event(kind, value)
