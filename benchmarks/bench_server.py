"""The server against the command line, on a full-size checkpoint, over real HTTP with OpenAI's Python client: a
fresh `python server.py` per dtype, and the command line (`--output_format json`) in fresh processes beside it.

Per dtype it measures:
- one stream: time to first token as the client sees it (request sent -> first text chunk) against the command
  line's `first_token_s` (image opened -> first token), and the decode rate (tokens after the first / the time
  between the first and the last token) against the command line's;
- four streams sent at once, each with its own image: their prefills run one after another (each alone, as the
  command line runs it), then all four decode together; the total decode rate while all four run, against one
  stream's;
- the HTTP and queue overhead: a POST /v1/paligemma's wall time at the client against the server's own account of
  the answer (its record's first_token_s + decode_s, from the request's arrival).

    python benchmarks/make_checkpoint.py      # once
    python benchmarks/bench_server.py         # float16 and int4, 64 tokens, 3 command-line runs and streams each
"""

import argparse
import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import QUANTIZED, ours  # noqa: E402
from bench_load import DEFAULT_MODEL, RESULTS, ROOT, cpu_name  # noqa: E402


def images(n: int) -> list[bytes]:
    """n different PNG images from the cat: flipped, rotated, cropped."""
    cat = Image.open(ROOT / "test_images" / "cat.jpg").convert("RGB")
    out = []
    for i in range(n):
        image = cat.rotate(90 * (i % 4), expand=True)
        image = ImageOps.mirror(image) if i // 4 % 2 else image
        image = image.crop((i, i, image.width - i, image.height - i))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


class Server:
    def __init__(self, model: Path, dtype: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        precision = ["--quantize", dtype] if dtype in QUANTIZED else ["--dtype", dtype]
        self.name = model.name
        self.process = subprocess.Popen([sys.executable, str(ROOT / "server.py"), "--model_path", str(model),
                                         "--port", str(self.port), "--max_batch", "4", "--only_cpu", "True",
                                         *precision], stderr=subprocess.PIPE, text=True)
        self.ready = threading.Event()
        threading.Thread(target=self.read, daemon=True).start()

    def read(self):
        for line in self.process.stderr:
            if line.startswith(("ready:", "error")):
                print(f"  server: {line.strip()}", file=sys.stderr)
                self.ready.set()

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0,
                             timeout=3600)

    def rss_gib(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as f:
            return next(int(line.split()[1]) / 2**20 for line in f if line.startswith("VmRSS:"))

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(120)


def stream(server: Server, image: bytes, prompt: str, tokens: int) -> dict:
    """One streamed chat answer: when it was sent, and when each of its tokens arrived."""
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": prompt}]}]
    sent, arrivals = time.monotonic(), []
    for chunk in server.client().chat.completions.create(model=server.name, messages=messages, max_tokens=tokens,
                                                         stream=True, logprobs=True):
        if chunk.choices and chunk.choices[0].logprobs:
            arrivals += [time.monotonic()] * len(chunk.choices[0].logprobs.content)
    return {"sent": sent, "arrivals": arrivals}


def decode_rate(answer: dict) -> float:
    arrivals = answer["arrivals"]
    return (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])


def together(answers: list[dict]) -> dict:
    """The total decode rate while every stream is running: tokens arriving between the last stream's first token
    and the first stream's last, over that time."""
    start, end = max(a["arrivals"][0] for a in answers), min(a["arrivals"][-1] for a in answers)
    count = sum(start < t <= end for a in answers for t in a["arrivals"])
    wall = max(a["arrivals"][-1] for a in answers) - min(a["sent"] for a in answers)
    return {"window_s": end - start, "rate": count / (end - start) if end > start else None,
            "end_to_end_rate": sum(len(a["arrivals"]) for a in answers) / wall}


def overhead(server: Server, image: bytes, prompt: str, tokens: int) -> dict:
    start = time.monotonic()
    reply = httpx.post(f"http://127.0.0.1:{server.port}/v1/paligemma", files={"image": ("i.png", image)},
                       data={"prompt": prompt, "max_tokens_to_generate": str(tokens)}, timeout=3600)
    wall = time.monotonic() - start
    timings = reply.json()["timings"]
    inside = timings["first_token_s"] + timings["decode_s"]
    return {"wall_s": wall, "server_s": inside, "overhead_s": wall - inside, "share": (wall - inside) / wall}


def measure(model: Path, dtype: str, prompt: str, tokens: int, repeat: int) -> dict:
    pictures = images(8)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / "bench-server-image.png"
    path.write_bytes(pictures[0])
    server = Server(model, dtype)
    cli, single = [], []
    try:
        if not server.ready.wait(1800) or server.process.poll() is not None:
            raise SystemExit("the server did not start")
        stream(server, pictures[7], prompt, 2)  # a first request pays the caches' first allocation
        for _ in range(repeat):  # taking turns, as this machine's speed moves from minute to minute
            cli.append(ours(model, path, prompt, dtype, tokens, "cpu"))  # the server waits idle meanwhile
            single.append(stream(server, pictures[0], prompt, tokens))
        print(f"{dtype}: command line first token {[round(c['first_token_s'], 2) for c in cli]} s", file=sys.stderr)
        with ThreadPoolExecutor(4) as pool:
            four = list(pool.map(lambda i: stream(server, pictures[1 + i], prompt, tokens), range(4)))
        http = overhead(server, pictures[5], prompt, tokens)
        rss = server.rss_gib()
    finally:
        exit_status = server.stop()
    cli_ttft = statistics.median(c["first_token_s"] for c in cli)
    cli_rate = statistics.median(c["decode_tokens"] / c["decode_s"] for c in cli)
    ttft = statistics.median(s["arrivals"][0] - s["sent"] for s in single)
    rate = statistics.median(decode_rate(s) for s in single)
    four_streams = together(four)
    return {"dtype": dtype, "cli_first_token_s": cli_ttft, "cli_decode_tok_s": cli_rate, "server_first_token_s": ttft,
            "server_decode_tok_s": rate, "four_streams": four_streams,
            "four_vs_one": four_streams["rate"] / rate if four_streams["rate"] else None, "http": http,
            "rss_gib": rss, "exit_status": exit_status, "cli_runs": cli,
            "single_runs": [{"first_token_s": s["arrivals"][0] - s["sent"], "decode_tok_s": decode_rate(s)}
                            for s in single]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--dtypes", nargs="+", default=["float16", "int4"])
    parser.add_argument("--prompt", default="caption en")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="command-line runs and single streams per dtype, "
                        "taking turns (the medians are reported)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not (args.model_path / "config.json").is_file():
        raise SystemExit(f"{args.model_path}: no checkpoint; make one with benchmarks/make_checkpoint.py")
    rows = [measure(args.model_path, dtype, args.prompt, args.tokens, args.repeat) for dtype in args.dtypes]
    print(f"\n{args.model_path.name}, {args.prompt!r}, {args.tokens} tokens; {cpu_name()}, {os.cpu_count()} CPUs")
    print("| dtype | CLI first token | server first token | difference | CLI decode | one stream | one / CLI "
          "| four streams together | four / one | HTTP overhead | server RSS |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        four, ratio = r["four_streams"]["rate"], r["four_vs_one"]
        print(f"| {r['dtype']} | {r['cli_first_token_s']:.2f} s | {r['server_first_token_s']:.2f} s "
              f"| {1000 * (r['server_first_token_s'] - r['cli_first_token_s']):+.0f} ms "
              f"| {r['cli_decode_tok_s']:.2f} tok/s | {r['server_decode_tok_s']:.2f} tok/s "
              f"| {r['server_decode_tok_s'] / r['cli_decode_tok_s']:.2f}x "
              f"| {'-' if four is None else f'{four:.2f} tok/s'} | {'-' if ratio is None else f'{ratio:.2f}x'} "
              f"| {1000 * r['http']['overhead_s']:.0f} ms ({100 * r['http']['share']:.2f}%) | {r['rss_gib']:.2f} GiB |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"server-{args.model_path.name}.json"
    path.write_text(json.dumps({"model": args.model_path.name, "prompt": args.prompt, "tokens": args.tokens,
                                "cpu": cpu_name(), "rows": rows}, indent=1))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
