"""Where a decode step's time goes: the weight products (gemv.c and quant.c, by weight shape, with the bandwidth
they stream at) against everything else (norms, attention, rotary angles, the KV cache, sampling's inputs, Python),
for each dtype in a fresh process. The step is `generate.decode_one_token` on the accelerated model, after a
prefill of `caption en` on test_images/cat.jpg; the products are timed by wrapping kernels.gemv and
kernels.gemv_quantized. `--rows 1 4` times steps of 1 and of 4 rows (the same prompt 4 times, as a server decodes
4 requests at once) and the cost of a step of 4 rows against one of 1.

    python benchmarks/bench_step.py                      # float16, int8 and int4 on paligemma-3b-pt-224
    python benchmarks/bench_step.py --rows 1 4           # and steps of 4 rows against steps of 1
    python benchmarks/bench_step.py --model_path ~/.cache/paligemma-bench/paligemma2-3b-pt-224 --dtypes bfloat16
"""

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import QUANTIZED  # noqa: E402
from bench_load import DEFAULT_MODEL, RESULTS, ROOT, cpu_name  # noqa: E402


def measure(model_path: Path, dtype_name: str, steps: int, blocks: int, rows: int) -> dict:
    """In this process: load, prefill, then time `blocks` runs of `steps` decode steps; the median block."""
    sys.path.insert(0, str(ROOT))
    import torch
    from PIL import Image

    from paligemma import kernels
    from paligemma.generate import decode_one_token, load_session, prefill

    dtype = None if dtype_name in QUANTIZED else getattr(torch, dtype_name)
    extra = {"quantize": dtype_name} if dtype_name in QUANTIZED else {}
    session = load_session(model_path, torch.device("cpu"), dtype, verbose=False, **extra)
    image = Image.open(ROOT / "test_images" / "cat.jpg").convert("RGB")
    inputs = session.processor(["caption en"] * rows, [image] * rows)
    spent = defaultdict(lambda: [0, 0.0, 0])  # weight shapes -> [calls, seconds, bytes a call]

    def timed(product):
        def wrapper(weights, x, *rest):
            start = time.perf_counter()
            ys = product(weights, x, *rest)
            entry = spent[" + ".join("x".join(map(str, w.shape)) for w in weights)]
            entry[0] += 1
            entry[1] += time.perf_counter() - start
            entry[2] = sum(w.qweight.nbytes + w.scales.nbytes if hasattr(w, "qweight") else w.nbytes for w in weights)
            return ys
        return wrapper

    kernels.gemv, kernels.gemv_quantized = timed(kernels.gemv), timed(kernels.gemv_quantized)
    results = []
    with torch.inference_mode():
        logits = prefill(session.model, inputs, (blocks + 1) * steps)
        token, position = logits.argmax(-1), torch.tensor([inputs["input_ids"].shape[1]])  # (rows,), (1,)
        for _block in range(blocks + 1):  # the first block warms up and is not counted
            spent.clear()
            start = time.perf_counter()
            for _ in range(steps):
                token = decode_one_token(session.model, token, position).argmax(-1)
                position += 1
            step_s = (time.perf_counter() - start) / steps
            shapes = {name: {"calls": calls / steps, "ms": s / steps * 1e3, "gb_s": calls * size / s / 1e9}
                      for name, (calls, s, size) in sorted(spent.items(), key=lambda kv: -kv[1][1])}
            products_s = sum(s for _, s, _ in spent.values()) / steps
            moved = sum(calls * size for calls, _, size in spent.values()) / steps
            results.append({"step_ms": step_s * 1e3, "products_ms": products_s * 1e3, "products_gb_s":
                            moved / products_s / 1e9, "rest_ms": (step_s - products_s) * 1e3, "shapes": shapes})
    return sorted(results[1:], key=lambda r: r["step_ms"])[blocks // 2]


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
        print(json.dumps(measure(args.model_path, args.child, args.steps, args.blocks, args.rows[0])))
        return
    rows = []
    for dtype in args.dtypes:
        for count in args.rows:
            print(f"{dtype}, {count} rows ...", file=sys.stderr)
            proc = subprocess.run([sys.executable, __file__, "--model_path", str(args.model_path), "--child", dtype,
                                   "--steps", str(args.steps), "--blocks", str(args.blocks), "--rows", str(count)],
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"the {dtype} run failed:\n{proc.stderr[-2000:]}")
            rows.append({"dtype": dtype, "rows": count, **json.loads(proc.stdout.strip().splitlines()[-1])})
    one = {r["dtype"]: r["step_ms"] for r in rows if r["rows"] == 1}
    for r in rows:
        if r["dtype"] in one:
            r["vs_one_row"] = r["step_ms"] / one[r["dtype"]]
    print(f"\n{args.model_path.name}, one decode step, median of {args.blocks} blocks of {args.steps}; {cpu_name()}")
    print("| dtype | rows | step | vs 1 row | weight products | their bandwidth | everything else |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ratio = f"{r['vs_one_row']:.2f}x" if "vs_one_row" in r else ""
        print(f"| {r['dtype']} | {r['rows']} | {r['step_ms']:.1f} ms | {ratio} | {r['products_ms']:.1f} ms "
              f"| {r['products_gb_s']:.1f} GB/s | {r['rest_ms']:.1f} ms |")
    print("\n| dtype | rows | weights (rows x cols) | calls a step | ms a step | GB/s |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        for name, s in r["shapes"].items():
            print(f"| {r['dtype']} | {r['rows']} | {name} | {s['calls']:.0f} | {s['ms']:.2f} | {s['gb_s']:.1f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"step-{args.model_path.name}.json"
    path.write_text(json.dumps({"model": args.model_path.name, "cpu": cpu_name(), "steps": args.steps,
                                "blocks": args.blocks, "rows": rows}, indent=1))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
