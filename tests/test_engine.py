"""The server's engine without HTTP: rows that join and leave at different moments compute exactly what each would
alone, and what the command line computes (generate.Session.answer)."""

import threading

import pytest
import torch
from conftest import random_image

from paligemma.engine import Closed, Engine, QueueFull, Request
from paligemma.generate import load_session

PROMPTS = ["caption en", "detect cat", "answer en what is this?", "ocr"]
LOADS = {"float32": dict(dtype=torch.float32), "float16": dict(dtype=torch.float16),
         "int4": dict(dtype=torch.float16, quantize="int4")}


class Recording(Engine):
    """An engine that keeps every row's logits at every step, and every request's events."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logits, self.events = {}, {}

    def choose(self, rows, logits):
        for row, row_logits in zip(rows, logits):
            self.logits.setdefault(row.request.seed, []).append(row_logits.clone())
        super().choose(rows, logits)


def request(session, engine, n: int, max_tokens: int, **kwargs) -> Request:
    inputs = session.processor([PROMPTS[n % len(PROMPTS)]], [random_image(40 + 9 * n, 30, seed=n)])
    events = engine.events.setdefault(n, [])
    return Request(inputs, max_tokens, seed=n, on_event=lambda kind, value: events.append((kind, value)), **kwargs)


def drive(engine: Engine, schedule: dict[int, list[Request]], steps: int):
    """Admit each step's newcomers (in the order given), then decode every running row once, steps times: the
    engine's own loop, made deterministic."""
    with torch.inference_mode():
        for i in range(steps):
            for newcomer in schedule.get(i, []):
                engine.admit(newcomer)
            if engine.rows:
                engine.step()


@pytest.fixture(scope="module", params=list(LOADS))
def session(request, checkpoint):
    return load_session(checkpoint("v2_gqa"), torch.device("cpu"), **LOADS[request.param], memory_check=False,
                        verbose=False)


def test_a_rows_logits_at_every_step_are_bit_identical_alone_or_beside_others_that_join_and_leave(session):
    alone = Recording(session, max_batch=4)
    drive(alone, {0: [request(session, alone, 0, 12)]}, 12)
    reference = alone.logits[0]
    assert len(reference) == 12 or alone.events[0][-1] == ("done", "stop")
    crowd = Recording(session, max_batch=4)
    # Row 1 runs first and leaves early (the rows behind it move up); 0 joins at step 2 in the second row; 2 joins
    # at once with it, 3 later, and a longer prompt grows the caches while 0 is decoding.
    drive(crowd, {0: [request(session, crowd, 1, 4)], 2: [request(session, crowd, 0, 12),
                                                          request(session, crowd, 2, 30)],
                  5: [request(session, crowd, 3, 300)]}, 40)
    assert len(crowd.logits[0]) == len(reference)
    for step, (got, want) in enumerate(zip(crowd.logits[0], reference)):
        assert torch.equal(got, want), f"step {step}"
    assert crowd.events[0] == alone.events[0]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_the_engine_answers_what_the_command_line_answers_greedy_and_seeded(session, temperature):
    engine = Recording(session, max_batch=4)
    drive(engine, {0: [request(session, engine, n, 10, temperature=temperature) for n in range(3)]}, 12)
    for n in range(3):
        session.temperature, session.generator = temperature, torch.Generator().manual_seed(n)
        inputs = session.processor([PROMPTS[n]], [random_image(40 + 9 * n, 30, seed=n)])
        [(ids, logprobs)] = session.answer(inputs, 10)
        tokens = [value for kind, value in engine.events[n] if kind == "token"]
        assert [t.id for t in tokens] == ids and [t.logprob for t in tokens] == logprobs
    session.temperature, session.generator = 0.0, None


def test_top_logprobs_are_the_likeliest_tokens_in_order_and_include_the_greedy_choice(session):
    engine = Recording(session)
    drive(engine, {0: [request(session, engine, 0, 5, top_logprobs=20)]}, 5)
    for _, token in engine.events[0][:-1]:
        ids, values = zip(*token.top)
        assert len(ids) == 20 and list(values) == sorted(values, reverse=True)
        assert ids[0] == token.id and values[0] == token.logprob


def test_cancelled_rows_leave_before_the_next_step_and_the_others_go_on(session):
    engine = Recording(session).start()
    done = threading.Event()
    events, other = [], []

    def on_event(kind, value):
        events.append((kind, value))
        if kind == "token" and len(events) == 2:
            first.cancelled = True

    first = Request(session.processor(["caption en"], [random_image(30, 30)]), 50, on_event=on_event)
    second = Request(session.processor(["caption en"], [random_image(30, 30, seed=1)]), 6,
                     on_event=lambda kind, value: (other.append(kind), kind != "token" and done.set()))
    engine.submit(first)
    engine.submit(second)
    assert done.wait(60)
    engine.stop(timeout=10)
    assert events[-1] == ("done", "cancelled") and len(events) <= 4  # at most one more step after the cancel
    assert other[-1] == "done" and not engine.rows


@pytest.mark.parametrize("tokens, timeout", [(10_000, 0), (200, 60)])
def test_closing_ends_the_waiting_at_once_and_cuts_the_running_only_past_the_timeout(session, tokens, timeout):
    engine = Engine(session, max_batch=1, max_queue=1)
    inputs = session.processor(["caption en"], [random_image(30, 30)])
    started, ended = threading.Event(), {}

    def on_event(name):
        return lambda kind, value: started.set() if kind == "token" else ended.setdefault(name, value)

    engine.submit(Request(inputs, tokens, on_event=on_event("running")))
    engine.start()
    assert started.wait(60)
    engine.submit(Request(inputs, 3, on_event=on_event("waiting")))  # the one row is taken: it waits
    with pytest.raises(QueueFull):
        engine.submit(Request(inputs, 3))
    assert not ended  # the tiny model's answer runs on past its first token
    engine.close(timeout)
    with pytest.raises(Closed):
        engine.submit(Request(inputs, 3))
    engine.stop(timeout=0)  # the first close's deadline holds
    assert isinstance(ended["waiting"], Closed)
    assert isinstance(ended["running"], Closed) if timeout == 0 else ended["running"] in ("stop", "length")
