"""Peak memory and time of loading a full-size PaliGemma checkpoint: this project against transformers.

Each loader runs in a fresh process; this process samples the child's resident memory (anonymous and file-backed,
from /proc/PID/status) every ~50 ms, and the child reports its own peak (VmHWM, file mappings included, as
`/usr/bin/time -v` reports it), its load time and its resident memory after loading. Prints a table, writes JSON
and a PNG chart of both memory timelines.

    python benchmarks/make_checkpoint.py           # once: a random checkpoint with the published names and shapes
    python benchmarks/bench_load.py                # ~/.cache/paligemma-bench/paligemma-3b-pt-224, float16
    python benchmarks/bench_load.py --model_path DIR --dtype bfloat16 --runs ours --verify --repeat 1
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = Path.home() / ".cache" / "paligemma-bench" / "paligemma-3b-pt-224"
RESULTS = ROOT / "benchmarks" / "results"

PRELUDE = """
import json, sys, time
sys.path.insert(0, sys.argv[3])  # the checkout whose loader runs
def status():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields
import torch
dtype = getattr(torch, sys.argv[2])
"""

CHILDREN = {
    "ours": PRELUDE + """
import utils
from transformers import AutoTokenizer  # imported before the clock starts, as the transformers child imports it
quantize = None if sys.argv[4] == "none" else sys.argv[4]
start = time.perf_counter()
model, tokenizer = utils.load_hf_model(sys.argv[1], "cpu", dtype, **({"quantize": quantize} if quantize else {}))
seconds = time.perf_counter() - start
tensors = [*model.parameters(), *(b for n, b in model.named_buffers() if n.endswith((".qweight", ".scales")))]
result = {"load_s": seconds, "params": sum(p.numel() for p in model.parameters()), **status(),
          "weight_bytes": sum(t.numel() * t.element_size() for t in tensors)}
if sys.argv[5:] == ["verify"]:  # verify: every parameter against the file's tensor rounded to the dtype, piece by piece
    from pathlib import Path
    from safetensors import safe_open
    from checkpoint import find_shards
    params, equal = dict(model.named_parameters()), True
    for entry in utils.plan_load(model, find_shards(Path(sys.argv[1]))):
        with safe_open(entry.file, "pt") as f:
            stored, loaded = f.get_slice(entry.key), params[entry.name]
            for i in range(0, loaded.shape[0], 4096):
                equal &= torch.equal(stored[i:i + 4096].to(dtype), loaded[i:i + 4096])
    result["values_equal_file"] = bool(equal)
print(json.dumps(result))
""",
    "transformers": PRELUDE + """
from transformers import AutoTokenizer, PaliGemmaForConditionalGeneration
start = time.perf_counter()
model = PaliGemmaForConditionalGeneration.from_pretrained(sys.argv[1], dtype=dtype, local_files_only=True)
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], local_files_only=True)
seconds = time.perf_counter() - start
print(json.dumps({"load_s": seconds, "params": model.num_parameters(), **status()}))
""",
}


# The instruction sets that decide which kernels run, as /proc/cpuinfo names them, and as the tables name them.
FEATURES = {"avx512f": "AVX-512", "avx512_vnni": "VNNI", "avx_vnni": "AVX-VNNI", "avx512_bf16": "BF16",
            "avx512_fp16": "FP16", "amx_tile": "AMX"}


def cpu_name() -> str:
    """The CPU's model name and its class, e.g. "AMD EPYC (AVX2)" or "AMD EPYC (AVX-512, VNNI, BF16)": a virtual
    machine's model name alone does not tell Zen 3 from Zen 4."""
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags")))
    except (OSError, StopIteration):
        return platform.machine()
    found = [v for k, v in FEATURES.items() if k in flags] or (["AVX2"] if "avx2" in flags else ["no AVX2"])
    return f"{name} ({', '.join(found)})"


def read_status(pid: int) -> dict | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in f)
                    if k in ("VmRSS", "RssAnon", "RssFile")}
    except (OSError, ValueError):
        return None


def run_child(name: str, model_path: Path, dtype: str, verify: bool, root: Path = ROOT,
              quantize: str = "none") -> dict:
    """Run one loader in a fresh process (this project's from the checkout root), sampling its memory every 50 ms."""
    child = CHILDREN["ours" if name == "baseline" else name]
    args = [sys.executable, "-c", child, str(model_path), dtype, str(root), quantize] + (["verify"] if verify else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    start = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    timeline = []
    while proc.poll() is None:
        sample = read_status(proc.pid)
        if sample:
            timeline.append((time.monotonic() - start, sample["RssAnon"], sample["RssFile"]))
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{name} loader failed ({proc.returncode}):\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(process_s=time.monotonic() - start, timeline=timeline,
                  peak_anon=max((a for _, a, _ in timeline), default=0),
                  peak_file=max((f for _, _, f in timeline), default=0))
    return result


def page_cache_state(model_path: Path, cold: bool) -> str:
    """Read the files once (warm) or try to drop the page cache (cold, needs root outside a container)."""
    files = sorted(model_path.glob("*.safetensors"))
    if cold:
        try:
            subprocess.run(["sync"], check=True)
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return "cold"
        except OSError as e:
            print(f"cannot drop the page cache ({e.strerror}); measuring warm", file=sys.stderr)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass
    return "warm"


def chart(results: dict, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    colours = {"ours": "tab:blue", "transformers": "tab:orange", "baseline": "tab:gray"}
    for name, r in results.items():
        t = [s[0] for s in r["timeline"]]
        ax.plot(t, [s[1] / 2**30 for s in r["timeline"]], color=colours[name], label=f"{name}: anonymous")
        ax.plot(t, [s[2] / 2**30 for s in r["timeline"]], color=colours[name], linestyle="--",
                label=f"{name}: file-backed (mapped shards)")
    ax.set_xlabel("seconds since the process started")
    ax.set_ylabel("resident memory (GiB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--quantize", default="none", choices=["none", "int8", "int4"],
                        help="ours quantizes the decoder while loading (a saved quantized folder needs its own)")
    parser.add_argument("--runs", nargs="+", default=["ours", "transformers"], choices=[*CHILDREN, "baseline"])
    parser.add_argument("--baseline", type=Path, help="another checkout of this project, run as 'baseline' "
                        "(e.g. `git worktree add /tmp/before HEAD~3`): a before/after comparison in one run")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each run (needs root)")
    parser.add_argument("--verify", action="store_true", help="also check every loaded value against the file")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each loader; the median is reported")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not (args.model_path / "config.json").is_file():
        raise SystemExit(f"{args.model_path}: no checkpoint; make one with benchmarks/make_checkpoint.py")
    if ("baseline" in args.runs) != (args.baseline is not None):
        raise SystemExit("--runs baseline and --baseline DIR go together")

    results, runs = {}, {name: [] for name in args.runs}
    for repeat in range(args.repeat):  # the loaders take turns, so that a slow moment of the machine hits both
        for name in args.runs:
            cache = page_cache_state(args.model_path, args.cold)
            print(f"running {name} ({cache} page cache), {repeat + 1} of {args.repeat} ...", file=sys.stderr)
            runs[name].append(run_child(name, args.model_path, args.dtype, verify=False,
                                        root=args.baseline if name == "baseline" else ROOT, quantize=args.quantize))
            runs[name][-1]["page_cache"] = cache
    for name, attempts in runs.items():  # the median run by load time, with every run's seconds beside it
        results[name] = sorted(attempts, key=lambda r: r["load_s"])[len(attempts) // 2]
        results[name]["load_s_all"] = [r["load_s"] for r in attempts]
        results[name]["process_s_all"] = [r["process_s"] for r in attempts]  # Python and imports included

    params = next(iter(results.values()))["params"]
    weights = results.get("ours", {}).get("weight_bytes") or params * {"float16": 2, "bfloat16": 2, "float32": 4}[
        args.dtype]
    gib, kind = 2**30, args.dtype + (f", decoder {args.quantize}" if args.quantize != "none" else "")
    print(f"\n{args.model_path.name}: {weights / gib:.2f} GiB of weights ({kind}); {cpu_name()}, {os.cpu_count()} CPUs")
    print("| loader | peak VmHWM GiB | peak - weights GiB | peak anon GiB | peak file-backed GiB | after GiB "
          "| load s (median) | every run s | process s (median) | page cache |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['VmHWM'] / gib:.2f} | {(r['VmHWM'] - weights) / gib:+.2f} | {r['peak_anon'] / gib:.2f} "
              f"| {r['peak_file'] / gib:.2f} | {r['VmRSS'] / gib:.2f} | {r['load_s']:.1f} "
              f"| {', '.join(f'{s:.1f}' for s in r['load_s_all'])} | {statistics.median(r['process_s_all']):.1f} "
              f"| {r['page_cache']} |")
    if args.verify:  # a run of its own, so that reading the file again does not show in the figures above
        equal = run_child("ours", args.model_path, args.dtype, verify=True)["values_equal_file"]
        results["ours"]["values_equal_file"] = equal
        print(f"ours: every value equals the file's tensor rounded to {args.dtype}: {equal}")

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"load-{args.model_path.name}-{args.dtype}" + (f"-{args.quantize}" if args.quantize != "none" else "")
    record = {"model": args.model_path.name, "dtype": args.dtype, "params": params, "weight_bytes": weights,
              "machine": {"cpus": os.cpu_count(), "processor": cpu_name(), "python": platform.python_version()},
              "results": results}
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    chart(results, args.out / f"{stem}.png", f"Loading {args.model_path.name} in {args.dtype}: resident memory")
    print(f"wrote {args.out / (stem + '.json')} and {stem}.png", file=sys.stderr)


if __name__ == "__main__":
    main()
