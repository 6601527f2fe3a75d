"""The batch mode on Ray (`--ray_address`): the same inputs, flags, records and --output as the local mode, answered
by a pool of Ray Data actors on one machine or many.

This process, the driver, opens and locks the results file and works out what is left to do exactly as the local
mode does (batch.write_answers), then gives Ray Data one row per batch: the batches the local mode would answer,
of the same inputs, so that every answer is the one the local mode gives. Each worker is an actor that loads the
model once (generate.load_session) and answers one batch per call (batch.answer_chunk). The records stream back
to the driver, the only writer of --output, as batches finish: not in input order, but each record carries its
input's index and identity, as every record does. A worker that dies is restarted by Ray and its batch retried; a
record that comes back twice is written once.

Imported only when --ray_address is given: the local mode never imports Ray.
"""

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Generator
from dataclasses import astuple, dataclass
from pathlib import Path

import ray
import torch

from paligemma import batch, masks
from paligemma.checkpoint import DTYPES
from paligemma.console import UserError, log, one_line, peak_rss_gib
from paligemma.generate import Session, Stopwatch, load_session
from paligemma.results import MARKER, ResultsFile, StdoutResults

ROOT = Path(__file__).resolve().parent
SHIPPED_WITHOUT = ["tests", "benchmarks", "examples", "docs", "test_images", ".ci"]  # workers need only the code
IDENTITY = (MARKER, "index", "image", "prompt", "line", "input")  # the fields the driver writes from its own items
WAIT_FOR_WORKERS_S = 600  # how long a cluster may take to find room for every worker (an autoscaler adding nodes)
CRASH_FILE = "PALIGEMMA_TEST_CRASH_FILE"  # test-only: names a file that makes one worker die mid-batch


@dataclass(frozen=True)
class Job:
    """What every worker needs to load the model and answer as the local mode would."""

    folder: str  # the folder the command was started in: relative paths mean the same on every node
    model_path: str
    dtype: str | None
    memory_check: bool
    batch_size: int
    length: int  # the positions to plan memory for: the longest prompt and the token budget
    max_tokens: int
    max_pixels: int
    temperature: float  # 0: greedy
    top_p: float
    seed: int | None
    compile: bool
    min_score: float  # objects of detect and segment answers that score below this are dropped
    vae_path: str | None
    annotate: str | None
    quantize: str | None = None  # int8 or int4: each worker quantizes while it loads


class Answerer:
    """A Ray Data actor: loads the model once, with a torch thread per CPU Ray gave it (on a GPU if given one),
    then answers one batch of inputs per row."""

    def __init__(self, job: Job):
        os.dup2(2, 1)  # what a worker writes to stdout, Ray prints on the driver's: keep that stdout for answers
        self.job, self.failure = job, None
        try:
            self.session = self.load()
        except UserError as e:  # told to the driver with the first batch, as an answer (Ray would tell it as text)
            self.failure = e

    def load(self) -> Session:
        """The model as the local mode loads it, in the driver's folder, on the CPUs (or GPU) Ray gave this worker."""
        job = self.job
        try:
            os.chdir(job.folder)
        except OSError:
            raise UserError(f"the folder the command was started in, {job.folder}, is not on {socket.gethostname()}: "
                            "start it from a folder every node has") from None
        resources = ray.get_runtime_context().get_assigned_resources()
        torch.set_num_threads(max(1, int(resources.get("CPU", 1))))
        device = torch.device("cuda" if resources.get("GPU") else "cpu")
        session = load_session(Path(job.model_path), device, DTYPES.get(job.dtype), temperature=job.temperature,
                               top_p=job.top_p, seed=job.seed, compile=job.compile, min_score=job.min_score,
                               vae=masks.load_vae(job.vae_path) if job.vae_path else None,
                               memory_check=job.memory_check, batch=job.batch_size, length=job.length, verbose=False,
                               quantize=job.quantize)
        log(f"{socket.gethostname()}: model loaded on {device} with {torch.get_num_threads()} threads, peak memory "
            f"{peak_rss_gib():.2f} GiB")
        return session

    def __call__(self, rows: dict) -> dict:
        """Each row's batch answered, as {"records": [...]}, or {"failure": why} from a worker that cannot answer
        (its model did not load, say), which ends the run with that one line."""
        answers = []
        for row in rows["batch"]:
            try:
                if self.failure is not None:
                    raise self.failure
                answers.append(json.dumps({"records": self.answer(json.loads(row))}))
            except UserError as e:
                answers.append(json.dumps({"failure": one_line(e)}))
        die_if_asked()
        return {"answer": answers}

    def answer(self, row: dict) -> list[dict]:
        """One batch's records, as the local mode makes them."""
        refused = set(row["refused"])
        return batch.answer_chunk(self.session, [batch.Item(*item) for item in row["items"]],
                                  max_tokens=self.job.max_tokens, max_pixels=self.job.max_pixels,
                                  annotate=Path(self.job.annotate) if self.job.annotate else None, clock=Stopwatch(),
                                  refused=lambda picture: str(picture) in refused)


def die_if_asked():
    """Test-only fault: the first worker that removes the file $PALIGEMMA_TEST_CRASH_FILE names is killed after
    answering its batch and before handing it back, as a machine that fails mid-batch."""
    path = os.environ.get(CRASH_FILE)
    if not path:
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def answer_on_ray(items: list[batch.Item], results: ResultsFile | StdoutResults, job: Job, *, address: str,
                  workers: int, cpus: int | None, gpus: float) -> tuple[int, int]:
    """Answer the items results do not hold yet on `workers` Ray actors of `cpus` CPUs (by default the cluster's
    shared evenly) and `gpus` GPUs each; the records go to results as in batch.answer_batch, which see."""
    answers_out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # what Ray prints there (starting, stopping): stdout is for answers
        connect(address)
        try:
            total = int(ray.cluster_resources().get("CPU", 0))
            cpus = cpus or max(1, total // workers)
            if workers * cpus > total:
                log(f"note: the cluster has {total} CPUs, fewer than --workers {workers} x --cpus_per_worker {cpus}: "
                    f"the run waits for more nodes, for up to {WAIT_FOR_WORKERS_S} s")
            with contextlib.redirect_stdout(AnswersOnly(answers_out, sys.stderr)):
                return batch.write_answers(items, results, job.batch_size, Path(job.annotate) if job.annotate
                                           else None, lambda chunks: answers(chunks, items, job, workers, cpus, gpus))
        except ray.exceptions.GetTimeoutError:
            raise UserError(f"Ray could not start --workers {workers} with --cpus_per_worker {cpus} and "
                            f"--gpus_per_worker {gpus:g} within {WAIT_FOR_WORKERS_S} s: the cluster has no room for "
                            "them; ask for fewer, or add nodes") from None
        finally:
            ray.shutdown()


class AnswersOnly:
    """The driver's stdout while answers come in: Ray prints its own messages there from its threads (a worker
    that died, say); those go to stderr, and stdout keeps only the answers the main thread writes."""

    def __init__(self, stdout, stderr):
        self.stdout, self.stderr = stdout, stderr

    def __getattr__(self, name: str):
        return getattr(self.stdout if threading.current_thread() is threading.main_thread() else self.stderr, name)


def connect(address: str):
    """Start Ray on this machine (`local`) or join a running cluster (`auto`, or its address), with this folder's
    code shipped to every worker; Ray's own progress bars and info lines stay off, this tool's bar counts images."""
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # workers' lines in a log file: no colour codes
    try:
        ray.init(address=address, runtime_env={"working_dir": str(ROOT), "excludes": SHIPPED_WITHOUT},
                 logging_level=logging.ERROR, **({"include_dashboard": False} if address == "local" else {}))
    except ConnectionError as e:
        raise UserError(f"--ray_address {address}: no Ray cluster to join ({one_line(e)})") from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.wait_for_min_actors_s = WAIT_FOR_WORKERS_S  # every worker has loaded its model before the first batch
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # its errors reach this tool, which says them in a line


def answers(chunks: list[list[batch.Item]], items: list[batch.Item], job: Job, workers: int, cpus: int,
            gpus: float) -> Generator[list[dict], None, None]:
    """Each batch's records as a worker finishes it, their identity written from the driver's own items."""
    if not chunks:
        return
    on_disk = batch.input_files(items) if job.annotate else set()
    rows = [{"batch": json.dumps(batch_row(chunk, job, on_disk))} for chunk in chunks]
    by_index = {item.index: item for chunk in chunks for item in chunk}
    # One block per batch: a worker that dies loses only its batch, and records come back as each batch is done.
    # Ray Data restarts a dead actor and retries its batch, without limit (its default for actor pools).
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        Answerer, fn_constructor_kwargs={"job": job}, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=cpus, num_gpus=gpus or None)
    rows = iter(dataset.iter_rows())
    try:
        for row in rows:
            answer = json.loads(row["answer"])
            if "failure" in answer:
                raise UserError(answer["failure"])
            yield [by_index[r["index"]].record(**{k: v for k, v in r.items() if k not in IDENTITY})
                   for r in answer["records"]]
    finally:  # stops Ray Data's executor now: left to run past ray.shutdown, its threads would start Ray again
        rows.close()


def batch_row(chunk: list[batch.Item], job: Job, on_disk: set[tuple[int, int]]) -> dict:
    """A batch as a worker gets it: its inputs, and the annotated pictures that would overwrite an input (checked
    here, once, as the driver sees the files)."""
    pictures = [batch.picture_path(Path(job.annotate), item) for item in chunk] if job.annotate else []
    return {"items": [astuple(item) for item in chunk],
            "refused": [str(p) for p in pictures if batch.overwrites(p, on_disk)]}
