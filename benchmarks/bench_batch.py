"""Images per second and peak memory of a batch run on this machine: the local mode, and Ray with 1 and 2 workers,
in one benchmark run, on the same images, prompt, flags and CPUs; and what Ray costs per image.

Each run is the command line as a user runs it (`inference.py --prompts_file ... --output ...`, with
`--ray_address local --workers N --cpus_per_worker CPUS/N` for Ray), in a fresh process. This process watches it:
- memory: every second, the proportional set size (PSS) of the command and of every process under it (Ray's own
  services and its workers) summed. A page that several processes map, like a checkpoint used in place by two
  workers, counts once among them, so the sum is what the run takes of the machine; the largest single process's
  resident set (RSS, shared pages counted whole) is given beside it;
- time: when each record reaches --output, and when each model is loaded (the loader's line on stderr locally, each
  worker's line for Ray, which Ray forwards with some delay). Two rates: over the whole run (start, loading and
  answering: what a user waits for), and once answers flow, from the first records written to the last (the
  images after the first write over the time between them: loading and Ray's start are not in it). Ray's cost
  per image is the difference in seconds per image of the whole run against the local mode.

    python benchmarks/make_checkpoint.py --variant paligemma2-3b-pt-224     # once: bfloat16 weights, used in place
    python benchmarks/bench_batch.py       # 16 copies of test_images/cat.jpg, "caption en", 32 tokens, batch 4
    python benchmarks/bench_batch.py --model_path ~/.cache/paligemma-bench/paligemma-3b-pt-224 --dtype float16
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import RESULTS, ROOT, cpu_name, page_cache_state  # noqa: E402

DEFAULT_MODEL = Path.home() / ".cache" / "paligemma-bench" / "paligemma2-3b-pt-224"
LOADED = re.compile(r"loaded [\d,]+ parameters as|: model loaded on")  # the local loader's line; a Ray worker's


def process_tree(root: int) -> list[int]:
    """root and every process under it, now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rpartition(")")[2].split()[1])
            children.setdefault(parent, []).append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def memory(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in bytes, or (0, 0) once it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in f)
                      if k in ("Pss", "Rss")}
        return fields.get("Pss", 0), fields.get("Rss", 0)
    except (OSError, ValueError):
        return 0, 0


def watch(proc: subprocess.Popen, output: Path, start: float) -> dict:
    """Until the run ends: when each record reaches its results file (every 0.25 s), and its memory (every second)."""
    peak_pss, peak_rss, processes, written, tick = 0, 0, 0, [], 0
    while proc.poll() is None:
        lines = output.read_bytes().count(b"\n") if output.exists() else 0
        if lines > (written[-1][1] if written else 0):
            written.append((time.monotonic() - start, lines))
        if tick % 4 == 0:
            tree = process_tree(proc.pid)
            sizes = [memory(pid) for pid in tree]
            peak_pss, peak_rss = max(peak_pss, sum(p for p, _ in sizes)), max(peak_rss, max(r for _, r in sizes))
            processes = max(processes, len(tree))
        tick += 1
        time.sleep(0.25)
    return {"peak_pss": peak_pss, "peak_rss": peak_rss, "processes": processes, "written": written}


def run(name: str, model: Path, dtype: str, prompts: Path, n: int, tokens: int, batch_size: int,
        ray: list[str]) -> dict:
    """One run of the command line, watched; its figures."""
    output = prompts.parent / f"{name}.jsonl"
    command = [sys.executable, str(ROOT / "inference.py"), "--model_path", str(model), "--prompts_file",
               str(prompts), "--dtype", dtype, "--max_tokens_to_generate", str(tokens), "--batch_size",
               str(batch_size), "--only_cpu", "True", "--output", str(output), *ray]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "RAY_COLOR_PREFIX": "0"}
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    loaded, lines = [], []

    def read_stderr():  # each model-loaded line, timed as it arrives
        for line in proc.stderr:
            lines.append(line)
            if LOADED.search(line):
                loaded.append(time.monotonic() - start)

    reader = threading.Thread(target=read_stderr)
    reader.start()
    watched = watch(proc, output, start)
    reader.join()
    wall = time.monotonic() - start
    answered = output.read_bytes().count(b"\n") if output.exists() else 0
    if proc.returncode != 0 or answered != n or not loaded:
        raise SystemExit(f"{name}: exit status {proc.returncode}, {answered} of {n} records:\n"
                         + "".join(lines[-20:]))
    (first, first_count), (done, _) = watched["written"][0], watched["written"][-1]
    flowing = (n - first_count) / (done - first) if done > first else float("nan")
    return {"name": name, "wall_s": wall, "ready_s": max(loaded), "first_record_s": first, "last_record_s": done,
            "images_per_s": n / wall, "images_per_s_flowing": flowing, "written": watched["written"],
            "models_loaded": len(loaded), "peak_pss_gib": watched["peak_pss"] / 2**30,
            "largest_process_rss_gib": watched["peak_rss"] / 2**30, "processes": watched["processes"]}


def chart(rows: list[dict], path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ray = [r for r in rows if r["workers"]]
    local = next(r for r in rows if not r["workers"])
    for key, label, color in (("images_per_s", "whole run", "tab:blue"), ("images_per_s_flowing", "once answers flow",
                                                                          "tab:orange")):
        ax.plot([r["workers"] for r in ray], [r[key] for r in ray], "o-", color=color, label=f"Ray, {label}")
        ax.axhline(local[key], color=color, linestyle="--", label=f"local mode, {label}")
    ax.set_xticks([r["workers"] for r in ray])
    ax.set_xlabel("workers on this machine (the CPUs shared evenly)")
    ax.set_ylabel("images/s")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--image", type=Path, default=ROOT / "test_images" / "cat.jpg")
    parser.add_argument("--prompt", default="caption en")
    parser.add_argument("--images", type=int, default=16, help="copies of the image to answer")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not (args.model_path / "config.json").is_file():
        raise SystemExit(f"{args.model_path}: no checkpoint; make one with benchmarks/make_checkpoint.py")
    cpus = len(os.sched_getaffinity(0))

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for i in range(args.images):  # copies, not links: each is an input of its own
            shutil.copy(args.image, folder / f"{i:04d}{args.image.suffix}")
        prompts = folder / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"image": f"{i:04d}{args.image.suffix}", "prompt": args.prompt}) + "\n"
                                   for i in range(args.images)))
        for workers in [0, *args.workers]:
            name = f"ray-{workers}" if workers else "local"
            ray = ["--ray_address", "local", "--workers", str(workers), "--cpus_per_worker",
                   str(max(1, cpus // workers))] if workers else []
            cache = page_cache_state(args.model_path, cold=False)
            print(f"{name} ({cache} page cache) ...", file=sys.stderr)
            rows.append({**run(name, args.model_path, args.dtype, prompts, args.images, args.tokens, args.batch_size,
                               ray), "workers": workers, "page_cache": cache})

    local = rows[0]
    for row in rows:
        row["overhead_s_per_image"] = 1 / row["images_per_s"] - 1 / local["images_per_s"]
    print(f"\n{args.model_path.name} in {args.dtype}, {args.images} images, {args.prompt!r}, {args.tokens} tokens, "
          f"--batch_size {args.batch_size}; {cpu_name()}, {cpus} CPUs")
    print("| run | CPUs per worker | images/s, whole run | vs local, s per image | images/s, answers flowing "
          "| loaded s | first record s | wall s | peak PSS of the run GiB | largest process RSS GiB | processes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        per_worker = cpus // row["workers"] if row["workers"] else cpus
        print(f"| {row['name']} | {per_worker} | {row['images_per_s']:.3f} | {row['overhead_s_per_image']:+.2f} "
              f"| {row['images_per_s_flowing']:.3f} | {row['ready_s']:.1f} | {row['first_record_s']:.1f} "
              f"| {row['wall_s']:.1f} | {row['peak_pss_gib']:.2f} "
              f"| {row['largest_process_rss_gib']:.2f} | {row['processes']} |")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"batch-{args.model_path.name}-{args.dtype}"
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"model": args.model_path.name, "dtype": args.dtype, "images": args.images, "tokens": args.tokens,
         "batch_size": args.batch_size, "prompt": args.prompt, "cpus": cpus, "cpu": cpu_name(), "rows": rows},
        indent=1))
    chart(rows, args.out / f"{stem}.png", f"{args.model_path.name}, {args.dtype}: {args.images} images, "
          f"{args.tokens} tokens, batch {args.batch_size}, {cpus} CPUs")
    print(f"wrote {args.out / (stem + '.json')} and {stem}.png", file=sys.stderr)


if __name__ == "__main__":
    main()
