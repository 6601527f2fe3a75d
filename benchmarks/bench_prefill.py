"""The first token against the CPU's own limit: the prefill's matrix products timed shape by shape with torch's
float32 and bfloat16 GEMM (weights already in that dtype: nothing to widen), against this project's command line
(`--output_format json`, its `first_token_s`), per dtype, as the CPU is and held to AVX2, each in fresh processes.

The products are every one the prefill multiplies with more rows than a decode step: the vision tower's (one row a
patch), the projector's, and the decoder's (one row a prompt token; the last layer multiplies q, k and v for every
token and the rest for the last one only, a matrix-vector product that is left out). Their time at the faster of
the two dtypes is the limit; the first token adds the image's preprocessing, attention, norms and the weights'
widening. The decoder's products are also timed with torch's own CPU kernels for int8 and int4 weights
(`torch.ops.aten._weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`), the alternative to widening a quantized weight
for a prompt. Held to AVX2 sets ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
PALIGEMMA_MARCH=haswell, as on the AVX2 laptops most users have.

    python benchmarks/make_checkpoint.py       # once
    python benchmarks/bench_prefill.py         # float16 bfloat16 int8 int4, as the CPU is and held to AVX2
    python benchmarks/bench_prefill.py --dtypes bfloat16 --classes avx2 --transformers
"""

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import Failed, ours, run, transformers  # noqa: E402
from bench_load import DEFAULT_MODEL, RESULTS, ROOT, cpu_name, page_cache_state  # noqa: E402

CLASSES = {
    "as it is": {},
    "held to AVX2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                     "PALIGEMMA_MARCH": "haswell"},
}
CLASS_FLAGS = {"native": "as it is", "avx2": "held to AVX2"}

PRODUCTS_CHILD = """
import json, statistics, sys, time
import torch
import torch.nn.functional as F
sys.path.insert(0, sys.argv[1])
import kernels
from checkpoint import load_config, load_tokenizer
from processing_paligemma import PaliGemmaProcessor
from PIL import Image
from pathlib import Path
folder, image, prompt = Path(sys.argv[2]), sys.argv[3], sys.argv[4]
config = load_config(folder)
processor = PaliGemmaProcessor(load_tokenizer(folder), config.vision_config.image_size, config.num_image_tokens)
L = processor([prompt], [Image.open(image)])["input_ids"].shape[1]
v, t = config.vision_config, config.text_config
P, D, I, H = v.num_patches, v.hidden_size, v.intermediate_size, t.hidden_size
q_out, kv_out = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
shapes = {}  # (rows, in, out) -> how many times the prefill multiplies it
for shape, count in [((P, D, D), 4 * v.num_hidden_layers), ((P, D, I), v.num_hidden_layers),
                     ((P, I, D), v.num_hidden_layers), ((P, D, H), 1), ((L, H, q_out), t.num_hidden_layers),
                     ((L, H, kv_out), 2 * t.num_hidden_layers), ((L, q_out, H), t.num_hidden_layers - 1),
                     ((L, H, t.intermediate_size), 2 * (t.num_hidden_layers - 1)),
                     ((L, t.intermediate_size, H), t.num_hidden_layers - 1)]:
    shapes[shape] = shapes.get(shape, 0) + count
result = {"prompt_tokens": L, "capability": torch.backends.cpu.get_cpu_capability(),
          "prompt_dtype": str(kernels.prompt_dtype()).removeprefix("torch."), "products": []}
for (rows, cols, out), count in shapes.items():
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(rows, cols).to(dtype), (torch.randn(out, cols) * 0.02).to(dtype)
        F.linear(x, w)
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            F.linear(x, w)
            runs.append(time.perf_counter() - start)
        times[str(dtype).removeprefix("torch.")] = statistics.median(runs)
    if rows == L:  # a decoder product: also torch's own kernels for int8 and int4 weights (bfloat16 x)
        x, w = torch.randn(rows, cols).bfloat16(), torch.randint(-127, 128, (out, cols), dtype=torch.int8)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.int() % 16, 8)
        scales = torch.rand(cols // 32, out, 2).bfloat16()  # a scale and a zero point per group of 32
        for name, product in [("int8pack", lambda: torch.ops.aten._weight_int8pack_mm(x, w, scales[0, :, 0])),
                              ("int4pack", lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, scales))]:
            product()
            runs = []
            for _ in range(3):
                start = time.perf_counter()
                product()
                runs.append(time.perf_counter() - start)
            times[name] = statistics.median(runs)
    result["products"].append({"shape": [rows, cols, out], "count": count, "seconds": times})
print(json.dumps(result))
"""


def products(model: Path, image: Path, prompt: str) -> dict:
    result, _ = run(["-c", PRODUCTS_CHILD, str(ROOT), str(model), str(image), prompt])
    for dtype in ("float32", "bfloat16"):
        result[f"{dtype}_s"] = sum(p["count"] * p["seconds"][dtype] for p in result["products"])
    result["limit_s"] = min(result["float32_s"], result["bfloat16_s"])
    decoder = [p for p in result["products"] if "int8pack" in p["seconds"]]
    for kind in ("float32", "bfloat16", "int8pack", "int4pack"):  # the decoder's products alone, by kernel
        result[f"decoder_{kind}_s"] = sum(p["count"] * p["seconds"][kind] for p in decoder)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--image", type=Path, default=ROOT / "test_images" / "cat.jpg")
    parser.add_argument("--prompt", default="caption en")
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16", "int8", "int4"],
                        help="float16, bfloat16, or the --quantize schemes int8 and int4")
    parser.add_argument("--classes", nargs="+", default=list(CLASS_FLAGS), choices=list(CLASS_FLAGS),
                        help="native: the CPU as it is; avx2: held to AVX2")
    parser.add_argument("--transformers", action="store_true", help="also transformers' first token (float16 and "
                        "bfloat16 of --dtypes)")
    parser.add_argument("--repeat", type=int, default=1, help="first-token runs of each dtype, taking turns; the "
                        "median is reported")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the folder the JSON goes in")
    args = parser.parse_args()
    if not (args.model_path / "config.json").is_file():
        raise SystemExit(f"{args.model_path}: no checkpoint; make one with benchmarks/make_checkpoint.py")

    rows, limits, saved = [], {}, dict(os.environ)
    for flag in args.classes:
        name = CLASS_FLAGS[flag]
        os.environ.update(CLASSES[name])  # the children inherit the class's limits
        try:
            print(f"{name}: the prefill's products ...", file=sys.stderr)
            limits[name] = products(args.model_path, args.image, args.prompt)
            runs = {(impl, dtype): [] for impl in ["ours", *(["transformers"] if args.transformers else [])]
                    for dtype in args.dtypes if impl == "ours" or dtype in ("float16", "bfloat16")}
            for _ in range(args.repeat):
                for impl, dtype in runs:
                    cache = page_cache_state(args.model_path, cold=False)
                    print(f"{name}: {impl} {dtype} ({cache} page cache) ...", file=sys.stderr)
                    try:
                        result = (ours if impl == "ours" else transformers)(args.model_path, args.image, args.prompt,
                                                                            dtype, 1, "cpu")
                    except Failed as e:
                        print(f"  failed: {e}", file=sys.stderr)
                        continue
                    runs[impl, dtype].append(result["first_token_s"])
            for (impl, dtype), seconds in runs.items():
                rows.append({"class": name, "impl": impl, "dtype": dtype, "first_token_s_all": seconds,
                             "first_token_s": statistics.median(seconds) if seconds else None,
                             "limit_s": limits[name]["limit_s"]})
        finally:
            os.environ.clear()
            os.environ.update(saved)

    print(f"\n{args.model_path.name}, prompt {args.prompt!r}, {args.image.name}; {cpu_name()}, {os.cpu_count()} CPUs")
    print("| CPU class | torch capability | prompt dtype chosen | prompt tokens | products in float32 s "
          "| products in bfloat16 s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, limit in limits.items():
        print(f"| {name} | {limit['capability']} | {limit['prompt_dtype']} | {limit['prompt_tokens']} "
              f"| {limit['float32_s']:.2f} | {limit['bfloat16_s']:.2f} |")
    print("\nThe decoder's products alone, by kernel (torch's `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` "
          "take int8 and int4 weights and bfloat16 x):")
    print("| CPU class | float32 s | bfloat16 s | torch int8pack s | torch int4pack s |")
    print("| --- | --- | --- | --- | --- |")
    for name, limit in limits.items():
        print(f"| {name} | {limit['decoder_float32_s']:.2f} | {limit['decoder_bfloat16_s']:.2f} "
              f"| {limit['decoder_int8pack_s']:.2f} | {limit['decoder_int4pack_s']:.2f} |")
    print("\n| CPU class | impl | dtype | first token s | products' limit s | first token / limit |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        first, limit = row["first_token_s"], row["limit_s"]
        print(f"| {row['class']} | {row['impl']} | {row['dtype']} | {'failed' if first is None else f'{first:.2f}'} "
              f"| {limit:.2f} | {'-' if first is None else f'{first / limit:.2f}x'} |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"prefill-{args.model_path.name}.json"
    path.write_text(json.dumps({"model": args.model_path.name, "prompt": args.prompt, "cpu": cpu_name(),
                                "classes": {n: CLASSES[n] for n in limits}, "limits": limits, "rows": rows}, indent=1))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
