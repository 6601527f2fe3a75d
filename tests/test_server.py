"""The server as users run it: `python server.py` spawned on a free loopback port with a tiny checkpoint, called with
the real `openai` client and raw HTTP. Every answer is compared with the command line's (the same Session.answer
that inference.py runs, or inference.py itself)."""

import base64
import io
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from conftest import ROOT, random_image

from paligemma.generate import load_session

PROMPTS = ["caption en", "detect cat", "answer en what is this?", "ocr"]
DEADLINE_S = 60
NAME = "paligemma-tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running `python server.py`: its port, process and the lines it wrote on stderr."""

    def __init__(self, folder, *flags):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, str(ROOT / "server.py"), "--model_path", str(folder),
                                         "--port", str(self.port), *flags], stderr=subprocess.PIPE, text=True)
        self.stderr: list[str] = []
        self.listening, self.ready = threading.Event(), threading.Event()
        threading.Thread(target=self.read_stderr, daemon=True).start()

    def read_stderr(self):
        for line in self.process.stderr:
            self.stderr.append(line)
            if line.startswith("listening on"):
                self.listening.set()
            if line.startswith("ready:"):
                self.ready.set()

    def wait_ready(self):
        assert self.ready.wait(DEADLINE_S), "".join(self.stderr)
        return self

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0,
                             timeout=DEADLINE_S, **kwargs)

    def rss_mib(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))

    def metric(self, name: str, headers=None) -> float:
        text = httpx.get(f"{self.url}/metrics", headers=headers).text
        return float(re.search(rf"^{name} (\S+)$", text, re.M)[1])

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(DEADLINE_S)


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def message(image_url: str, prompt: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                         {"type": "text", "text": prompt}]}]


@pytest.fixture(scope="module")
def folder(checkpoint):
    return checkpoint("v2_gqa")


@pytest.fixture(scope="module")
def server(folder):
    server = Server(folder, "--max_batch", "4", "--max_image_pixels", "40000", "--served_model_name", NAME)
    assert server.listening.wait(DEADLINE_S), "".join(server.stderr)
    loading = httpx.get(f"{server.url}/health")  # the model loads after the server listens
    yield server, loading
    assert server.stop() == 0


@pytest.fixture(scope="module")
def session(folder):
    """The command line's Session for the same checkpoint and dtype, in this process."""
    return load_session(folder, torch.device("cpu"), None, memory_check=False, verbose=False)


def cli_answer(session, image, prompt: str, max_tokens: int) -> tuple[list[int], list[float]]:
    [(ids, logprobs)] = session.answer(session.processor([prompt], [image]), max_tokens)
    return ids, logprobs


def test_health_is_503_while_loading_then_200(server):
    server, loading = server
    assert loading.status_code == 503 and loading.json()["error"]["message"] == "Loading model"
    server.wait_ready()
    assert httpx.get(f"{server.url}/health").status_code == 200
    models = server.client().models.list()
    assert [m.id for m in models.data] == [NAME]


def test_chat_answers_equal_the_command_lines_with_logprobs_and_objects(server, session):
    server = server[0].wait_ready()
    image = random_image(60, 40, seed=3)
    for prompt in ("caption en", "detect cat"):
        ids, logprobs = cli_answer(session, image, prompt, 12)
        reply = server.client().chat.completions.create(model=NAME, messages=message(data_url(image), prompt),
                                                        max_tokens=12, logprobs=True, top_logprobs=3)
        choice = reply.choices[0]
        assert choice.message.content == session.tokenizer.decode(ids, skip_special_tokens=True)
        assert [t.logprob for t in choice.logprobs.content] == logprobs
        assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.logprob for t in choice.logprobs.content)
        assert choice.finish_reason == ("stop" if ids[-1] in session.stop_ids else "length")
        assert reply.usage.completion_tokens == len(ids)
        assert ("detections" in reply.model_extra) == (prompt == "detect cat")


def test_a_stream_joins_into_the_answer_role_first_finish_last_then_usage(server, session):
    server = server[0].wait_ready()
    image = random_image(50, 50, seed=4)
    ids, _ = cli_answer(session, image, "caption en", 16)
    chunks = list(server.client().chat.completions.create(
        model=NAME, messages=message(data_url(image), "caption en"), max_tokens=16, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        session.tokenizer.decode(ids, skip_special_tokens=True)
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == len(ids)


def test_stop_strings_cut_the_answer_streamed_or_not(server, session):
    server = server[0].wait_ready()
    image = random_image(50, 50, seed=5)
    text = session.tokenizer.decode(cli_answer(session, image, "caption en", 12)[0], skip_special_tokens=True)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    for stream in (False, True):
        reply = server.client().chat.completions.create(model=NAME, messages=message(data_url(image),
                                                        "caption en"), max_tokens=12, stop=[stop], stream=stream)
        content = "".join(c.choices[0].delta.content or "" for c in reply) if stream else \
            reply.choices[0].message.content
        assert content == text[:text.index(stop)]


def test_concurrent_requests_at_random_moments_each_get_the_command_lines_answer(server, session):
    server = server[0].wait_ready()
    rng = random.Random(0)
    jobs = [(random_image(30 + 7 * i, 40, seed=10 + i), PROMPTS[i % 4], rng.randint(3, 20), rng.random() < 0.5)
            for i in range(10)]

    def ask(job):
        image, prompt, max_tokens, stream = job
        time.sleep(rng.random() * 0.5)
        reply = server.client().chat.completions.create(model=NAME, messages=message(data_url(image), prompt),
                                                        max_tokens=max_tokens, stream=stream, logprobs=True)
        if stream:
            return [t.logprob for c in reply if c.choices and c.choices[0].logprobs
                    for t in c.choices[0].logprobs.content]
        return [t.logprob for t in reply.choices[0].logprobs.content]

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    for (image, prompt, max_tokens, _), got in zip(jobs, answers):
        assert got == cli_answer(session, image, prompt, max_tokens)[1]


def test_the_multipart_route_answers_the_command_lines_json_record(server, folder, tmp_path):
    server = server[0].wait_ready()
    image = tmp_path / "photo.png"
    random_image(45, 35, seed=6).save(image)
    cli = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--model_path", str(folder), "--image_file_path",
                          str(image), "--prompt", "detect cat", "--max_tokens_to_generate", "10", "--output_format",
                          "json"], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    with open(image, "rb") as f:
        reply = httpx.post(f"{server.url}/v1/paligemma", files={"image": f},
                           data={"prompt": "detect cat", "max_tokens_to_generate": "10"}, timeout=DEADLINE_S)
    expected, got = json.loads(cli.stdout), reply.json()
    timings = set(expected.pop("timings"))
    assert set(got.pop("timings")) >= timings and got == expected
    with open(image, "rb") as f, httpx.stream("POST", f"{server.url}/v1/paligemma", files={"image": f}, data={
            "prompt": "detect cat", "max_tokens_to_generate": "10", "stream": "true"}, timeout=DEADLINE_S) as reply:
        events = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    assert reply.headers["content-type"].startswith("text/event-stream") and events[-1] == "[DONE]"
    *pieces, record = map(json.loads, events[:-1])
    assert "".join(piece["text"] for piece in pieces) == expected["text"]  # streamed, then the same record
    assert set(record["record"].pop("timings")) >= timings
    assert record["record"] == expected


def raw(server, request: bytes, timeout: float = DEADLINE_S) -> tuple[int, bytes]:
    """Send bytes as they are, a piece at a time, while reading the answer (a server may answer, and close, before
    a body it refuses has been sent); its status and body."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        def send():
            try:
                for at in range(0, len(request), 1 << 16):
                    s.sendall(request[at:at + (1 << 16)])
            except OSError:  # the server has answered and closed
                pass

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"messages": "hi"}).encode(), 400, "messages must be a list"),
    (json.dumps({"messages": message("data:image/png;base64,AAAA", "caption en"), "max_tokens": 0}).encode(), 400,
     "max_tokens must be"),
    (json.dumps({"messages": message("data:image/png;base64,AAAA", "caption en"), "top_p": 2}).encode(), 400,
     "top_p must be"),
    (json.dumps({"messages": [{"role": "user", "content": "caption en"}]}).encode(), 400, "no image"),
    (json.dumps({"messages": message("data:image/png;base64,@@@", "caption en")}).encode(), 400, "not valid base64"),
    (json.dumps({"messages": message("data:image/png;base64,AAAA", "caption en")}).encode(), 400,
     "not an image"),
    (json.dumps({"messages": message("http://example.com/cat.png", "caption en")}).encode(), 400, "not allowed"),
    (json.dumps({"messages": message("file:///etc/passwd", "caption en")}).encode(), 400, "not allowed"),
    (json.dumps({"messages": message("cat.png", "caption en")}).encode(), 400, "not allowed"),
    (json.dumps({"messages": message(data_url(random_image(300, 300)), "caption en")}).encode(), 400,
     "above the limit"),
    (json.dumps({"messages": message(data_url(random_image(30, 30)), "caption en " + "cat " * 9000)}).encode(), 400,
     "positions"),
    (json.dumps({"messages": message(data_url(random_image(30, 30)), "caption en"), "tools": [{}]}).encode(), 400,
     "tools are not supported"),
    (json.dumps({"model": "other", "messages": []}).encode(), 404, "does not exist"),
])
def test_bad_requests_get_an_openai_error_and_the_next_request_is_answered(server, body, status, words):
    server = server[0].wait_ready()
    reply = httpx.post(f"{server.url}/v1/chat/completions", content=body, timeout=DEADLINE_S)
    error = reply.json()["error"]
    assert reply.status_code == status and words in error["message"], error
    assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in reply.text
    good = server.client().chat.completions.create(
        model=NAME, messages=message(data_url(random_image(30, 30)), "caption en"), max_tokens=2)
    assert good.choices[0].finish_reason in ("stop", "length")


def test_routes_methods_hosts_and_body_sizes_are_refused_in_openai_errors(server):
    server = server[0].wait_ready()
    assert httpx.get(f"{server.url}/v1/nothing").status_code == 404
    assert httpx.delete(f"{server.url}/v1/models").status_code == 405
    evil = httpx.get(f"{server.url}/v1/models", headers={"Host": "evil.example:80"})
    assert evil.status_code == 400 and "DNS rebinding" in evil.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/models", headers={"Host": f"localhost:{server.port}"}).status_code == 200
    assert httpx.options(f"{server.url}/v1/models").headers.get("access-control-allow-origin") is None
    huge = 40 << 20
    status, body = raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: "
                       + str(huge).encode() + b"\r\nConnection: close\r\n\r\n{")  # refused before the body comes
    assert status == 413 and "limit" in json.loads(body)["error"]["message"]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in [b"x" * (1 << 20)] * 34) + b"0\r\n\r\n"
    status, body = raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: "
                       b"chunked\r\nConnection: close\r\n\r\n" + chunked)
    assert status == 413


def endless(session, tokens: int = 300):
    """An image whose greedy caption runs tokens long without a stop token, so that its row stays busy."""
    for image in (random_image(30, 30, seed=seed) for seed in range(100)):
        ids = cli_answer(session, image, "caption en", tokens)[0]
        if len(ids) == tokens and not set(ids) & set(session.stop_ids):
            return image
    raise AssertionError("no image of 100 has an answer without a stop token")


def test_a_client_that_leaves_frees_its_row_within_a_step(server, session):
    server = server[0].wait_ready()
    body = {"model": NAME, "messages": message(data_url(endless(session)), "caption en"), "max_tokens": 5000}
    for stream in (True, False):
        payload = json.dumps({**body, "stream": stream}).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as s:  # a client that never reads its answer
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
            wait_for(lambda: server.metric("paligemma_running_rows") == 1)
        wait_for(lambda: server.metric("paligemma_running_rows") == 0)


def wait_for(condition):
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_memory_after_200_images_stays_within_100_mb_of_after_10(server):
    server = server[0].wait_ready()

    def ask(i):
        with httpx.Client(timeout=DEADLINE_S) as http:
            files = {"image": ("i.png", png(random_image(20 + i % 50, 20 + i // 50, seed=i)))}
            assert http.post(f"{server.url}/v1/paligemma", files=files,
                             data={"max_tokens_to_generate": "2"}).status_code == 200

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(ask, range(10)))
        after_10 = server.rss_mib()
        list(pool.map(ask, range(10, 200)))
    assert server.rss_mib() - after_10 < 100


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_flags_and_checkpoints_get_one_line_before_anything_listens(folder, tmp_path):
    for args, words in ((["--model_path", str(folder), "--max_batch", "0"], "--max_batch must be"),
                        (["--model_path", str(tmp_path)], "config.json"),
                        (["--model_path", str(folder), "--port", "x"], "--port must be")):
        done = subprocess.run([sys.executable, str(ROOT / "server.py"), *args], capture_output=True, text=True,
                              timeout=DEADLINE_S)
        assert done.returncode == 1 and words in done.stderr and len(done.stderr.strip().splitlines()) == 1, \
            done.stderr
        assert "listening" not in done.stderr


def test_api_key_cors_queue_local_files_and_sigterm(folder, session, tmp_path):
    (tmp_path / "media").mkdir()
    random_image(30, 30).save(tmp_path / "media" / "cat.png")
    server = Server(folder, "--api_key", "sesame", "--cors_origins", "https://app.example", "--max_batch", "1",
                    "--max_queue", "1", "--allowed_local_media_path", str(tmp_path / "media"),
                    "--allowed_media_domains", "localhost", "--shutdown_timeout", "2").wait_ready()
    try:
        assert httpx.get(f"{server.url}/health").status_code == 200  # health needs no key
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            reply = httpx.get(f"{server.url}/v1/models", headers=headers)
            assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"
        client = server.client(api_key="sesame")
        assert client.models.list().data[0].id == folder.name  # the folder's name by default
        preflight = httpx.options(f"{server.url}/v1/chat/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        local = client.chat.completions.create(model=folder.name, max_tokens=2, messages=message(
            f"file://{tmp_path / 'media' / 'cat.png'}", "caption en"))
        assert local.choices[0].finish_reason in ("stop", "length")
        for url, words in ((f"file://{tmp_path}/media/../../etc/passwd", "outside"),
                           ("https://localhost/cat.png", "not a public address"),
                           ("https://example.com/cat.png", "not in --allowed_media_domains")):
            with pytest.raises(openai.BadRequestError, match=words):
                client.chat.completions.create(model=folder.name, max_tokens=2, messages=message(url, "caption en"))
        # One row runs (longer than the test), one request waits, the next is refused. SIGTERM refuses the waiting
        # one at once and gives the running one --shutdown_timeout seconds, then cuts it with an error event.
        running = client.chat.completions.create(model=folder.name, max_tokens=5000, stream=True, messages=message(
            data_url(endless(session, 5000)), "caption en"))
        next(iter(running))
        waiting = {}

        def wait():
            try:
                client.chat.completions.create(model=folder.name, max_tokens=2, messages=message(
                    data_url(random_image(30, 30)), "caption en"))
            except openai.APIStatusError as e:
                waiting["error"] = e

        waiter = threading.Thread(target=wait)
        waiter.start()
        # (Its greedy answer has no end-of-text in 5000 tokens: the row runs until it is cut.)
        wait_for(lambda: server.metric("paligemma_queue_length", {"Authorization": "Bearer sesame"}) == 1)
        with pytest.raises(openai.APIStatusError) as full:
            client.chat.completions.create(model=folder.name, max_tokens=2, messages=message(
                data_url(random_image(30, 30)), "caption en"))
        assert full.value.status_code == 503 and full.value.response.headers["retry-after"]
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        waiter.join(DEADLINE_S)
        assert waiting["error"].status_code == 503 and "shutting down" in waiting["error"].message
        with pytest.raises(openai.APIError, match="shut down before the answer was complete"):
            for _ in running:
                pass
        assert time.monotonic() - signalled >= 2
        assert server.process.wait(DEADLINE_S) == 0
    finally:
        if server.process.poll() is None:
            os.kill(server.process.pid, signal.SIGKILL)
