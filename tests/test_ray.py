"""The batch mode on Ray (--ray_address): record for record the local mode's results, whatever fails, on a local
Ray instance that the command starts and on a two-node cluster simulated on this machine (ray.cluster_utils.Cluster:
two raylets of one CPU each, started once for this module). Every run starts in the inputs' folder and names the
inputs and the checkpoint by relative paths, which the workers must read as the driver does."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, random_image
from PIL import Image
from ray.cluster_utils import Cluster
from test_hostile_input import run

import paligemma
from paligemma import inference, ray_batch

PROMPTS = ["caption en", "answer en what colour is the cup?", "detect cat ; dog"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder of seven images, a prompts file with three prompts and one input that is not an image: four batches
    of two."""
    folder = tmp_path_factory.mktemp("inputs")
    lines = []
    for i in range(7):
        random_image(40 + 3 * i, 30 + 2 * i, seed=i).save(folder / f"im{i}.png")
        lines.append(json.dumps({"image": f"im{i}.png", "prompt": PROMPTS[i % 3]}))
    (folder / "broken.png").write_text("not an image")
    lines.insert(3, json.dumps({"image": "broken.png", "prompt": "caption en"}))
    (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def args(checkpoint, inputs, output, *extra) -> list:
    """The command line, run in the inputs' folder: every path relative to it."""
    return ["--model_path", os.path.relpath(checkpoint("v1_mqa"), inputs), "--prompts_file", "prompts.jsonl",
            "--batch_size", 2, "--max_tokens_to_generate", 5, "--dtype", "float32", "--only_cpu", "True",
            "--output", output, *extra]


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def local_records(checkpoint, inputs, tmp_path_factory) -> list[dict]:
    """The local mode's results file for the same inputs and flags, answered with one torch thread as each worker
    below is (--cpus_per_worker 1): with another count, products can sum in another order, and logprobs differ in
    their last digits."""
    output = tmp_path_factory.mktemp("local") / "local.jsonl"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(inputs)
        patch.setattr(sys, "argv", ["inference.py", *map(str, args(checkpoint, inputs, output))])
        torch.set_num_threads(1)
        try:
            with pytest.raises(SystemExit):
                inference.cli()
        finally:
            torch.set_num_threads(threads)
    got = records(output)
    assert got[3]["error"].startswith("broken.png: not an image")  # named as the prompts file names it
    return got


def assert_same_as_local(output, local_records):
    got = records(output)
    assert sorted(r["index"] for r in got) == list(range(len(local_records)))  # each input exactly once
    assert sorted(got, key=lambda r: r["index"]) == local_records


def test_a_local_ray_instance_writes_the_local_modes_records_and_pictures(checkpoint, inputs, local_records,
                                                                          tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(inputs)
    output, boxes = tmp_path / "ray.jsonl", tmp_path / "boxes"
    boxes.mkdir()
    os.link(inputs / "im2.png", boxes / "00002-im2.png")  # where input 2's detections would be drawn
    code, out, err = run(args(checkpoint, inputs, output, "--ray_address", "local", "--cpus_per_worker", 1,
                              "--annotate", boxes), capsys, monkeypatch)
    assert code == 1 and err.strip().splitlines()[-1] == "error: 2 of 8 inputs failed; their records say why"
    assert out == ""
    expected = [*local_records]
    expected[2] = {**{k: v for k, v in local_records[2].items() if k in ray_batch.IDENTITY},
                   "error": f"{boxes / '00002-im2.png'} is an input image; it is never overwritten"}
    assert_same_as_local(output, expected)
    assert (boxes / "00002-im2.png").read_bytes() == (inputs / "im2.png").read_bytes()
    assert sorted(p.name for p in boxes.iterdir()) == ["00002-im2.png", "00006-im5.png"]  # the other detect input
    assert Image.open(boxes / "00006-im5.png").size == Image.open(inputs / "im5.png").size


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two Ray nodes on this machine, one CPU each; their raylets, and so every worker, know the crash file of
    ray_batch.die_if_asked, which a test arms by creating it."""
    crash = tmp_path_factory.mktemp("crash") / "crash-now"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ray_batch.CRASH_FILE, str(crash))
        nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        nodes.add_node(num_cpus=1)
    nodes.crash_file = crash
    yield nodes
    nodes.shutdown()


def test_on_two_nodes_with_a_worker_killed_mid_batch_every_input_is_written_once_as_locally(
        checkpoint, inputs, local_records, cluster, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(inputs)
    cluster.crash_file.write_text("")  # the first worker to answer a batch dies before handing it back
    output = tmp_path / "ray.jsonl"
    # Two workers of one CPU on two nodes of one CPU: the run starts once both are loaded, one on each node.
    code, out, err = run(args(checkpoint, inputs, output, "--ray_address", cluster.address, "--workers", 2,
                              "--cpus_per_worker", 1), capsys, monkeypatch)
    assert not cluster.crash_file.exists()
    assert code == 1 and "1 of 8 inputs failed" in err and out == ""
    assert_same_as_local(output, local_records)


def test_workers_the_cluster_has_no_room_for_end_the_run_with_one_line(checkpoint, inputs, cluster, tmp_path,
                                                                       capsys, monkeypatch):
    monkeypatch.setattr(ray_batch, "WAIT_FOR_WORKERS_S", 2)
    monkeypatch.chdir(inputs)
    output = tmp_path / "ray.jsonl"
    code, out, err = run(args(checkpoint, inputs, output, "--ray_address", cluster.address, "--workers", 3,
                              "--cpus_per_worker", 1), capsys, monkeypatch)
    assert (code, out) == (1, "") and not output.exists()
    assert "fewer than --workers 3 x --cpus_per_worker 1" in err
    assert err.strip().splitlines()[-1] == ("error: Ray could not start --workers 3 with --cpus_per_worker 1 and "
                                            "--gpus_per_worker 0 within 2 s: the cluster has no room for them; ask "
                                            "for fewer, or add nodes")


def test_a_worker_that_cannot_load_the_model_ends_the_run_with_its_one_line(checkpoint, inputs, cluster, tmp_path,
                                                                            capsys, monkeypatch):
    folder = Path(shutil.copytree(checkpoint("v1_mqa"), tmp_path / "no-weights",
                                  ignore=shutil.ignore_patterns("*.safetensors*")))  # the driver reads no weights
    monkeypatch.chdir(inputs)
    output = tmp_path / "ray.jsonl"
    argv = args(checkpoint, inputs, output, "--ray_address", cluster.address, "--cpus_per_worker", 1)
    argv[1] = os.path.relpath(folder, inputs)
    code, out, err = run(argv, capsys, monkeypatch)
    assert (code, out) == (1, "") and not output.exists()
    assert err.strip().splitlines()[-1] == (f"error: {argv[1]}: no weights (model.safetensors or "
                                            "model.safetensors.index.json)")


KILLED_AFTER_FIRST_WRITE = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from paligemma import inference, results
write = results.ResultsFile.write
def write_then_die(self, records):
    write(self, records)
    os.kill(os.getpid(), signal.SIGKILL)
results.ResultsFile.write = write_then_die
sys.argv = ["inference.py", *sys.argv[2:]]
inference.cli()
"""


def test_a_driver_killed_mid_run_and_rerun_finishes_with_every_input_once(checkpoint, inputs, local_records, cluster,
                                                                         tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(inputs)
    output = tmp_path / "ray.jsonl"
    argv = [str(a) for a in args(checkpoint, inputs, output, "--ray_address", cluster.address, "--cpus_per_worker",
                                 1)]
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_FIRST_WRITE, str(ROOT), *argv], capture_output=True,
                            text=True)
    assert killed.returncode == -9 and len(records(output)) == 2, killed.stderr  # SIGKILL after one batch
    broken_done = 3 in [r["index"] for r in records(output)]
    code, _, err = run(argv, capsys, monkeypatch)
    assert code == (0 if broken_done else 1) and "resuming: 2 inputs already done" in err
    assert_same_as_local(output, local_records)


def test_without_ray_the_flag_fails_before_any_work_saying_how_to_install_it(checkpoint, inputs, tmp_path, capsys,
                                                                              monkeypatch, no_loading):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails, as where it is not installed
    monkeypatch.chdir(inputs)
    output = tmp_path / "out.jsonl"
    code, out, err = run(args(checkpoint, inputs, output, "--ray_address", "local"), capsys, monkeypatch)
    assert (code, out) == (1, "") and not output.exists()
    assert err.strip() == "error: --ray_address needs Ray: pip install -r requirements-ray.txt"


def test_the_local_mode_never_imports_ray(checkpoint, inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.delitem(sys.modules, "paligemma.ray_batch")
    monkeypatch.delattr(paligemma, "ray_batch")
    monkeypatch.chdir(inputs)
    code, _, err = run(args(checkpoint, inputs, tmp_path / "out.jsonl"), capsys, monkeypatch)
    assert code == 1 and "1 of 8 inputs failed" in err and "paligemma.ray_batch" not in sys.modules


@pytest.mark.parametrize("extra, message", [
    (["--workers", 2], "--workers goes with --ray_address"),
    (["--ray_address", "local", "--gpus_per_worker", 1], "--gpus_per_worker gives the workers GPUs"),
    (["--ray_address", "local", "--workers", 0], "--workers must be a whole number >= 1"),
    (["--ray_address", "local", "--cpus_per_worker", 1.5], "--cpus_per_worker must be a whole number >= 1"),
])
def test_ray_flags_that_cannot_work_are_refused_before_any_work(extra, message, checkpoint, inputs, tmp_path,
                                                                capsys, monkeypatch, no_loading):
    monkeypatch.chdir(inputs)
    code, out, err = run(args(checkpoint, inputs, tmp_path / "out.jsonl", *extra), capsys, monkeypatch)
    assert (code, out) == (1, "") and message in err.strip().splitlines()[-1]


def test_one_image_without_output_is_not_a_ray_job(checkpoint, inputs, capsys, monkeypatch, no_loading):
    code, _, err = run(["--model_path", checkpoint("v1_mqa"), "--image_file_path", inputs / "im0.png",
                        "--ray_address", "local"], capsys, monkeypatch)
    assert code == 1 and "--ray_address answers many inputs" in err
