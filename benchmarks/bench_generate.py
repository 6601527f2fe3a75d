"""Time to first token, decode speed and peak memory of generation: this project's command line against
transformers' `generate`, each in a fresh process, on the same folder, image, prompt, dtype and token count.

Ours is run exactly as a user runs it (`inference.py ... --output_format json`) and read from the `timings` it
prints; transformers' first-token and decode times come from a streamer's timestamps. Decode speed is also given
as a fraction of this machine's memory-bandwidth limit: the bytes of decoder weights read per token (the layers and
the tied output head) against a measured copy bandwidth (bytes read plus bytes written per second).

    python benchmarks/make_checkpoint.py      # once
    python benchmarks/bench_generate.py       # float16 and bfloat16, 32 new tokens, test_images/cat.jpg
    python benchmarks/bench_generate.py --dtypes bfloat16 --tokens 64 --runs ours
    python benchmarks/bench_generate.py --model_path ~/.cache/paligemma-bench/paligemma2-10b-pt-224 \
        --dtypes bfloat16 --tokens 16 --cold     # the 10B model on a 24 GiB machine, from a cold page cache
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import DEFAULT_MODEL, RESULTS, ROOT, cpu_name, page_cache_state  # noqa: E402

TRANSFORMERS_CHILD = """
import json, sys, time, torch
from PIL import Image
from transformers import AutoProcessor, PaliGemmaForConditionalGeneration
from transformers.generation.streamers import BaseStreamer
path, image_path, prompt, n, device = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[5]), sys.argv[6]
dtype, extra = getattr(torch, sys.argv[4]), json.loads(sys.argv[7])  # extra: e.g. cache_implementation="static"
start = time.monotonic()
model = PaliGemmaForConditionalGeneration.from_pretrained(path, dtype=dtype, local_files_only=True).to(device).eval()
processor = AutoProcessor.from_pretrained(path, local_files_only=True)
load_s = time.monotonic() - start

class Clock(BaseStreamer):  # generate() calls put() once with the prompt, then once per new token
    def __init__(self):
        self.times = []
    def put(self, value):
        if device == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.monotonic())
    def end(self):
        pass

def run():
    clock = Clock()
    start = time.monotonic()
    inputs = processor(images=Image.open(image_path), text=prompt, return_tensors="pt").to(device)
    inputs.pop("labels", None)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock, **extra)
    return clock, start, out[0, inputs["input_ids"].shape[1]:].tolist()

compile_s = None
if extra:  # a compiled path pays its compilation on the first call: time that apart, then measure a second call
    begin = time.monotonic()
    run()
    compile_s = time.monotonic() - begin
clock, start, ids = run()
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 2**20
gpu = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
print(json.dumps({"load_s": load_s, "first_token_s": clock.times[1] - start,
                  "decode_s": clock.times[-1] - clock.times[1], "decode_tokens": len(clock.times) - 2,
                  "peak_rss_gib": hwm, "peak_gpu_gib": gpu, "compile_s": compile_s, "token_ids": ids}))
"""


class Failed(Exception):
    """A run that did not finish: killed (out of memory, say) or an error."""


TIME_LIMIT = {"s": None}  # --time_limit: a run still going after this many seconds is stopped and counted failed


def run(args: list[str]) -> tuple[dict, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                              timeout=TIME_LIMIT["s"])
    except subprocess.TimeoutExpired:
        raise Failed(f"stopped after {TIME_LIMIT['s']:.0f} s (--time_limit) without an answer") from None
    wall = time.monotonic() - start
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        why = f"killed by signal {-proc.returncode} (the kernel's out-of-memory killer sends 9)" if (
            proc.returncode < 0) else f"exit status {proc.returncode}: {last}"
        raise Failed(f"{why} after {wall:.0f} s")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


QUANTIZED = ("int8", "int4")  # --dtypes that are --quantize schemes: the weights' dtype is the checkpoint's own


def precision(dtype: str) -> list[str]:
    return ["--quantize", dtype] if dtype in QUANTIZED else ["--dtype", dtype]


def ours(model: Path, image: Path, prompt: str, dtype: str, tokens: int, device: str, root: Path = ROOT) -> dict:
    on_gpu = ["--only_cpu", "False", "--compile", "True"] if device == "cuda" else ["--only_cpu", "True"]
    result, wall = run([str(root / "inference.py"), "--model_path", str(model), "--image_file_path", str(image),
                        "--prompt", prompt, *precision(dtype), "--max_tokens_to_generate", str(tokens),
                        "--output_format", "json", *on_gpu])
    return {**result["timings"], "process_s": wall, "generated": len(result["token_ids"])}


def transformers(model: Path, image: Path, prompt: str, dtype: str, tokens: int, device: str, **extra) -> dict:
    if dtype in QUANTIZED:
        raise Failed("not run: transformers has no such scheme")
    result, wall = run(["-c", TRANSFORMERS_CHILD, str(model), str(image), prompt, dtype, str(tokens), device,
                        json.dumps(extra)])
    return {**result, "process_s": wall, "generated": len(result.pop("token_ids"))}


IMPLEMENTATIONS = {
    "ours": ours,
    "transformers": transformers,
    # transformers' fastest path: a static cache, which its generate() then compiles automatically
    "transformers-static": lambda *args: transformers(*args, cache_implementation="static"),
    "baseline": ours,  # this project's command line from the checkout --baseline names
}


def batch_rate(model: Path, image: Path, prompt: str, dtype: str, tokens: int, batch_size: int, device: str,
               n: int = 8) -> dict:
    """Images per second of generation for n inputs answered batch_size at a time by our command line."""
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"image": str(image), "prompt": prompt}) + "\n" for _ in range(n)))
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--model_path", str(model),
                               "--prompts_file", str(prompts), "--batch_size", str(batch_size), *precision(dtype),
                               "--max_tokens_to_generate", str(tokens), "--only_cpu", str(device == "cpu"),
                               "--verbose", "True"],
                              capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise Failed(f"exit status {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    seconds = float(re.search(r"inputs in ([\d.]+) s of generation", proc.stderr).group(1))
    return {"batch_size": batch_size, "inputs": n, "generate_s": seconds, "images_per_s": n / seconds}


def copy_bandwidth(device: str) -> float:
    """Bytes read plus bytes written per second by a 1 GiB copy on the device, the best of five."""
    src, dst = torch.ones(1 << 28, device=device), torch.empty(1 << 28, device=device)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


def decoder_bytes(model: Path, dtype: str) -> int:
    """Bytes of weights one decode step reads: every language-model parameter (the embedding is the head)."""
    sys.path.insert(0, str(ROOT))
    from paligemma.checkpoint import load_config

    text = load_config(model).text_config
    per_layer = (text.hidden_size * text.head_dim * (2 * text.num_attention_heads + 2 * text.num_key_value_heads)
                 + 3 * text.hidden_size * text.intermediate_size + (4 if text.is_gemma2 else 2) * text.hidden_size)
    params = text.num_hidden_layers * per_layer + text.vocab_size * text.hidden_size + text.hidden_size
    if dtype in QUANTIZED:  # the integers, and a float16 scale per group of them
        from paligemma.quantization import SCHEMES

        return int(params * ((1 if dtype == "int8" else 0.5) + 2 / SCHEMES[dtype].group))
    return params * getattr(torch, dtype).itemsize


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--image", type=Path, default=ROOT / "test_images" / "cat.jpg")
    parser.add_argument("--prompt", default="caption en")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"],
                        help="float16, bfloat16, float32, or the --quantize schemes int8 and int4 (ours only)")
    parser.add_argument("--runs", nargs="+", default=["ours", "transformers"], choices=list(IMPLEMENTATIONS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: ours with --compile; add transformers-static to --runs there")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each run (needs root)")
    parser.add_argument("--batch_sizes", type=int, nargs="*", default=[1, 4, 8],
                        help="also answer 8 images this many at a time (ours); none to skip")
    parser.add_argument("--batch_dtypes", nargs="*", help="the dtypes of those batch runs (default: the first)")
    parser.add_argument("--baseline", type=Path, help="another checkout of this project, run as 'baseline' "
                        "(e.g. `git worktree add /tmp/before HEAD~3`): a before/after comparison in one run")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each dtype and implementation, taking "
                        "turns; each figure's median is reported")
    parser.add_argument("--time_limit", type=float, help="seconds after which a run is stopped and counted failed")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the folder the JSON goes in")
    args = parser.parse_args()
    TIME_LIMIT["s"] = args.time_limit
    if not (args.model_path / "config.json").is_file():
        raise SystemExit(f"{args.model_path}: no checkpoint; make one with benchmarks/make_checkpoint.py")
    if ("baseline" in args.runs) != (args.baseline is not None):
        raise SystemExit("--runs baseline and --baseline DIR go together")

    bandwidth = copy_bandwidth(args.device)
    attempts = {(dtype, name): [] for dtype in args.dtypes for name in args.runs}
    for _ in range(args.repeat):  # every dtype and implementation takes a turn, so that a slow moment hits them all
        for dtype, name in attempts:
            cache = page_cache_state(args.model_path, args.cold)
            print(f"{name} {dtype} ({cache} page cache) ...", file=sys.stderr)
            extra = {"root": args.baseline} if name == "baseline" else {}
            try:
                result = IMPLEMENTATIONS[name](args.model_path, args.image, args.prompt, dtype, args.tokens,
                                               args.device, **extra)
            except Failed as e:
                attempts[dtype, name].append({"failed": str(e), "page_cache": cache})
                continue
            # ours compiles within its decode (--compile on CUDA); transformers' compiled path, in a call apart
            compile_s = (result.get("compile_s") or 0.0) if name in ("ours", "baseline") else 0.0
            attempts[dtype, name].append({**result, "page_cache": cache,
                                          "decode_tok_s": result["decode_tokens"] / (result["decode_s"] - compile_s),
                                          "bandwidth_limit_tok_s": bandwidth / decoder_bytes(args.model_path, dtype)})
    rows = []
    for (dtype, name), runs in attempts.items():  # each figure's median over the runs, with every run's beside it
        done = [r for r in runs if "failed" not in r]
        figures = ("first_token_s", "decode_tok_s", "load_s", "peak_rss_gib")
        row = {**done[0], **{k: statistics.median(r[k] for r in done) for k in figures}} if done else runs[0]
        rows.append({"impl": name, "dtype": dtype, **row, "every_run": [{k: r.get(k) for k in figures} for r in done]})
    reference = "baseline" if "baseline" in args.runs else "transformers"

    print(f"\n{args.model_path.name}, {args.tokens} new tokens, prompt {args.prompt!r}, {args.image.name}; "
          f"{cpu_name()}, {os.cpu_count()} CPUs, copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)")
    print("| impl | dtype | load s | first token s | decode tok/s | of bandwidth limit | peak RSS GiB "
          f"| first token vs {reference} | decode vs {reference} | page cache | compile s | peak GPU GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    half = next((r for r in rows if r["impl"] == "ours" and r["dtype"] == "float16" and "failed" not in r), None)
    for row in rows:
        if "failed" in row:
            print(f"| {row['impl']} | {row['dtype']} | failed: {row['failed']} | | | | | | | {row['page_cache']} | | |")
            continue
        base = next((r for r in rows if r["impl"] == reference and r["dtype"] == row["dtype"]
                     and "failed" not in r), None)
        if base is None and row["dtype"] in QUANTIZED and half is not None:
            base = {**half, "impl": "our float16"}  # a quantized row against our float16, the goal's measure
        ratios = "- | -" if base is None else (f"{row['first_token_s'] / base['first_token_s']:.2f}x | "
                                               f"{row['decode_tok_s'] / base['decode_tok_s']:.2f}x"
                                               + (f" (vs {base['impl']})" if base["impl"] != reference else ""))
        print(f"| {row['impl']} | {row['dtype']} | {row['load_s']:.1f} | {row['first_token_s']:.2f} "
              f"| {row['decode_tok_s']:.2f} | {row['decode_tok_s'] / row['bandwidth_limit_tok_s']:.0%} "
              f"| {row['peak_rss_gib']:.2f} | {ratios} | {row['page_cache']} | {row.get('compile_s') or '-'} "
              f"| {row.get('peak_gpu_gib') or '-'} |")
    batches = []
    for dtype in args.batch_dtypes or args.dtypes[:1]:
        for size in args.batch_sizes:
            print(f"ours {dtype}, 8 images, batch {size} ...", file=sys.stderr)
            batches.append({"dtype": dtype, **batch_rate(args.model_path, args.image, args.prompt, dtype, args.tokens,
                                                         size, args.device)})
    if batches:
        print(f"\nours, 8 images, {args.tokens} new tokens each:")
        print("| dtype | batch size | generation s | images/s |")
        print("| --- | --- | --- | --- |")
        for row in batches:
            print(f"| {row['dtype']} | {row['batch_size']} | {row['generate_s']:.1f} | {row['images_per_s']:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"generate-{args.model_path.name}{'-cold' if args.cold else ''}.json"
    path.write_text(json.dumps({"model": args.model_path.name, "tokens": args.tokens, "prompt": args.prompt,
                                "copy_bandwidth_bytes_s": bandwidth, "cpu": cpu_name(), "rows": rows,
                                "batches": batches}, indent=1))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
