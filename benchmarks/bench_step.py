"""Where a decode step's time goes: the weight products (gemv.c and quant.c, with the bandwidth they stream at, by
weight shape) against everything else (norms, attention, rotary angles, the KV cache, the logits' float32 copy that
sampling starts from, Python), for each dtype in a fresh process, beside the machine's copy bandwidth. The step is
`generate.decode_one_token` on the accelerated model, after a prefill of `caption en` on test_images/cat.jpg. Its
layers run in one C call (decoder.Decoder), which counts the seconds its products take
(`decode_product_seconds`); the output head's product is timed by wrapping kernels.gemv and gemv_quantized; the
rest of the step is everything else. The table by weight shape times each shape's products alone, right after each
step (the same weights in the same order, through kernels.gemv and gemv_quantized, on inputs of the same shapes).
`--rows 1 4` times steps of 1 and of 4 rows (the same prompt 4 times, as a server decodes 4 requests at once) and
the cost of a step of 4 rows against one of 1, in the same process, their blocks taking turns (1 row decodes the
first of the 4 cache rows): this machine's copy bandwidth moves by half from process to process, which a ratio
across processes would measure instead.

    python benchmarks/bench_step.py                      # float16, int8 and int4 on paligemma-3b-pt-224
    python benchmarks/bench_step.py --rows 1 4           # and steps of 4 rows against steps of 1
    python benchmarks/bench_step.py --model_path ~/.cache/paligemma-bench/paligemma2-3b-pt-224 --dtypes bfloat16
"""

import argparse
import itertools
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import QUANTIZED  # noqa: E402
from bench_load import DEFAULT_MODEL, RESULTS, ROOT, cpu_name  # noqa: E402


def copy_bandwidth(gib: float = 1.0, runs: int = 5) -> float:
    """The machine's copy bandwidth as STREAM counts it, bytes read and written a second (the best of `runs`), copying
    `gib` GiB with torch's threads: about what a pass reading weights far larger than the caches can stream at."""
    import torch

    src = torch.ones(int(gib * (1 << 30)) // 2, dtype=torch.float16)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def measure(model_path: Path, dtype_name: str, steps: int, blocks: int, counts: list[int]) -> list[dict]:
    """In this process: load, prefill max(counts) rows, then time `blocks` runs of `steps` decode steps of each count
    of rows in turn, and after each step its products alone by shape; the median block of each count."""
    sys.path.insert(0, str(ROOT))
    import torch
    from PIL import Image

    from paligemma import kernels
    from paligemma.generate import decode_one_token, load_session, prefill

    dtype = None if dtype_name in QUANTIZED else getattr(torch, dtype_name)
    extra = {"quantize": dtype_name} if dtype_name in QUANTIZED else {}
    session = load_session(model_path, torch.device("cpu"), dtype, verbose=False, **extra)
    image = Image.open(ROOT / "test_images" / "cat.jpg").convert("RGB")
    inputs = session.processor(["caption en"] * max(counts), [image] * max(counts))
    model = session.model
    groups = []  # a step's products: (weights, input columns), in the order a step multiplies them
    for layer in model.language_model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        groups += [([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], attn.q_proj.weight.shape[1]),
                   ([attn.o_proj.weight], attn.o_proj.weight.shape[1]),
                   ([mlp.gate_proj.weight, mlp.up_proj.weight], mlp.gate_proj.weight.shape[1]),
                   ([mlp.down_proj.weight], mlp.down_proj.weight.shape[1])]
    groups.append(([model.language_model.lm_head.weight], model.language_model.lm_head.weight.shape[1]))
    half = model.language_model.model.norm.weight.dtype
    product = kernels.gemv_quantized if hasattr(groups[0][0][0], "qweight") else kernels.gemv
    xs = {rows: {cols: torch.randn(rows, cols).to(half) for _, cols in groups} for rows in counts}

    def products(spent: dict, xs: dict):
        """Each group's product once, timed into spent: weight shapes -> [calls, seconds, bytes a call] (with the
        few microseconds of Python that build a call's arguments, which the one-call decoder does not run)."""
        for weights, cols in groups:
            start = time.perf_counter()
            product(weights, xs[cols], half)
            entry = spent[" + ".join("x".join(map(str, w.shape)) for w in weights)]
            entry[0] += 1
            entry[1] += time.perf_counter() - start
            entry[2] = sum(w.qweight.nbytes + w.scales.nbytes if hasattr(w, "qweight") else w.nbytes for w in weights)

    lib, head = kernels.library(), [0.0]

    def timed(product):  # the output head's product, which runs outside decode.c's layers
        def wrapper(*args):
            start = time.perf_counter()
            ys = product(*args)
            head[0] += time.perf_counter() - start
            return ys
        return wrapper

    kernels.gemv, kernels.gemv_quantized = timed(kernels.gemv), timed(kernels.gemv_quantized)
    results = {rows: [] for rows in counts}
    with torch.inference_mode():
        logits = prefill(model, inputs, (blocks + 1) * steps * len(counts))
        token = logits.argmax(-1)  # (max rows,)
        position = torch.full((len(token), 1), inputs["input_ids"].shape[1])  # each row's own
        for _block, rows in itertools.product(range(blocks + 1), counts):  # the first round warms up, not counted
            step_s, spent, head[0], layers = 0.0, defaultdict(lambda: [0, 0.0, 0]), 0.0, lib.decode_product_seconds()
            for _ in range(steps):  # a step, then its products alone by shape
                start = time.perf_counter()
                token[:rows] = decode_one_token(model, token[:rows], position[:rows]).float().argmax(-1)
                step_s += (time.perf_counter() - start) / steps
                position[:rows] += 1
                products(spent, xs[rows])
            in_step_s = (lib.decode_product_seconds() - layers + head[0]) / steps
            shapes = {name: {"calls": calls / steps, "ms": s / steps * 1e3, "gb_s": calls * size / s / 1e9}
                      for name, (calls, s, size) in sorted(spent.items(), key=lambda kv: -kv[1][1])}
            moved = sum(calls * size for calls, _, size in spent.values()) / steps
            results[rows].append({"step_ms": step_s * 1e3, "products_ms": in_step_s * 1e3, "products_gb_s":
                                  moved / in_step_s / 1e9, "rest_ms": (step_s - in_step_s) * 1e3, "shapes": shapes})
    copy = copy_bandwidth() / 1e9
    return [{"rows": rows, **sorted(runs[1:], key=lambda r: r["step_ms"])[blocks // 2], "copy_gb_s": copy}
            for rows, runs in results.items()]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--dtypes", nargs="+", default=["float16", "int8", "int4"])
    parser.add_argument("--steps", type=int, default=10, help="decode steps a block")
    parser.add_argument("--blocks", type=int, default=3, help="blocks of steps; the median is reported")
    parser.add_argument("--rows", nargs="+", type=int, default=[1], help="rows a step decodes at once")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.model_path, args.child, args.steps, args.blocks, args.rows)))
        return
    rows = []
    for dtype in args.dtypes:
        print(f"{dtype}, {' and '.join(map(str, args.rows))} rows ...", file=sys.stderr)
        proc = subprocess.run([sys.executable, __file__, "--model_path", str(args.model_path), "--child", dtype,
                               "--steps", str(args.steps), "--blocks", str(args.blocks),
                               "--rows", *map(str, args.rows)], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"the {dtype} run failed:\n{proc.stderr[-2000:]}")
        rows += [{"dtype": dtype, **r} for r in json.loads(proc.stdout.strip().splitlines()[-1])]
    one = {r["dtype"]: r["step_ms"] for r in rows if r["rows"] == 1}
    for r in rows:
        if r["dtype"] in one:
            r["vs_one_row"] = r["step_ms"] / one[r["dtype"]]
    print(f"\n{args.model_path.name}, one decode step, median of {args.blocks} blocks of {args.steps}; {cpu_name()}")
    print("| dtype | rows | step | vs 1 row | weight products | their bandwidth | of copy | everything else |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ratio = f"{r['vs_one_row']:.2f}x" if "vs_one_row" in r else ""
        print(f"| {r['dtype']} | {r['rows']} | {r['step_ms']:.1f} ms | {ratio} | {r['products_ms']:.1f} ms "
              f"| {r['products_gb_s']:.1f} GB/s | {r['products_gb_s'] / r['copy_gb_s']:.0%} | {r['rest_ms']:.1f} ms |")
    print("\n| dtype | rows | weights (rows x cols) | calls a step | ms a step | GB/s | of copy |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        for name, s in r["shapes"].items():
            print(f"| {r['dtype']} | {r['rows']} | {name} | {s['calls']:.0f} | {s['ms']:.2f} | {s['gb_s']:.1f} "
                  f"| {s['gb_s'] / r['copy_gb_s']:.0%} |")
    print("\ncopy bandwidth (1 GiB copied by torch, bytes read and written a second, best of 5, in each dtype's "
          "process): " + ", ".join(f"{r['dtype']} {r['copy_gb_s']:.1f}" for r in rows if r["rows"] == args.rows[0])
          + " GB/s")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"step-{args.model_path.name}.json"
    path.write_text(json.dumps({"model": args.model_path.name, "cpu": cpu_name(), "steps": args.steps,
                                "blocks": args.blocks, "rows": rows}, indent=1))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
