"""The whole loop on s3:// against local disk, step by step, and what each storage fault does.

Run from the repository root (needs the dev extra, for moto's S3 server; a few minutes on 2
idle CPU cores)::

    .venv/bin/python benchmarks/object_storage.py
    .venv/bin/python benchmarks/object_storage.py --rows 100000 --steps 40 --wait-idle 600
    # against a real store instead of moto (AWS_* set, the bucket exists; no fault cases):
    .venv/bin/python benchmarks/object_storage.py --bucket s3://my-bucket/ctcvr-bench

Every step is the command a team runs, as a subprocess, once with its paths on the local disk
and once on ``s3://`` (by default moto's server, started in this process on loopback with
signature checks on, the server of the tests):

===========  =================================================================================
simulate     ``python -m trainer.data simulate --rows R --out ROOT/sim``
train        ``torchrun --nproc_per_node=2 -m trainer.train`` (demo config, tiny model) reading
             ``ROOT/sim``, writing ``ROOT/run``, ``train.steps=S/2`` (ends with a checkpoint)
resume       the same with ``--resume train.steps=S``: loads the checkpoint, trains, evaluates
export       ``python -m trainer.export --run ROOT/run --out ROOT/model``
serve        ``python -m serving --model-dir ROOT/model`` until ``/readyz`` (the fetch into
             the cache included), then 200 one-row requests, then SIGTERM
===========  =================================================================================

Outputs, under ``--out`` (default ``benchmarks/results``): ``object_storage.md`` (the table of
seconds per step on each side and their ratio, with the share of the CPUs other processes took
during the step, and the fault cases with the message each printed), ``object_storage.png`` and
``object_storage.json``. A step measured while other processes took more than 10 % of the CPUs
is marked, and the comparison called inconclusive. moto runs on the same CPUs as the trainer (a
real store does not), so its own CPU time is part of the ``s3`` column.

The fault cases (moto only; each against a fresh copy of the run): the server stopped in the
middle of training (then restarted, and the run resumed), wrong credentials, a missing bucket,
a truncated DCP shard, a truncated ``meta.json``, a truncated table file of the model, a model
directory without its manifest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from schemas import storage

log = logging.getLogger("benchmarks.object_storage")

_BUSY_SHARE = 0.10  # other processes above this share of the CPUs: the comparison is inconclusive
_TICK = os.sysconf("SC_CLK_TCK")
_TINY = [
    "model.num_experts=2",
    "model.expert_sizes=[16]",
    "model.tower_sizes=[8]",
    "data.batch_size=256",
    "data.eval_batch_size=4096",
    "data.shuffle_buffer=2048",
    "train.log_every=5",
    "train.progress=false",
]


@dataclass(frozen=True)
class Settings:
    rows: int  # simulated impressions
    steps: int  # training steps in all (half before the resume)
    requests: int  # one-row scoring requests
    bucket: str | None  # s3://bucket/prefix of a real store; None: moto in this process
    out: Path
    wait_idle: float


@dataclass
class Step:
    name: str
    seconds: float
    others_cpu_share: float | None
    detail: str = ""


# Measuring ---------------------------------------------------------------------------------------


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat; None off Linux."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


def _own_cpu_s() -> float:
    """CPU seconds of this process (moto's server included) and of its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@contextlib.contextmanager
def _measured(name: str, steps: list[Step]) -> Iterator[Step]:
    """Time a step, and the share of all CPUs that other processes took meanwhile."""
    step = Step(name, 0.0, None)
    ticks, own, start = _cpu_ticks(), _own_cpu_s(), time.perf_counter()
    yield step
    step.seconds = time.perf_counter() - start
    after = _cpu_ticks()
    if ticks is not None and after is not None and after[1] > ticks[1]:
        busy = (after[0] - ticks[0]) / _TICK - (_own_cpu_s() - own)
        step.others_cpu_share = max(0.0, busy) / ((after[1] - ticks[1]) / _TICK)
    steps.append(step)
    log.info("%s: %.1f s (others took %s of the CPUs)", name, step.seconds, _share(step))


def _share(step: Step) -> str:
    return "?" if step.others_cpu_share is None else f"{step.others_cpu_share:.0%}"


def _wait_for_idle(timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = _cpu_ticks()
        time.sleep(2.0)
        after = _cpu_ticks()
        if before is None or after is None or after[1] == before[1]:
            return
        if (after[0] - before[0]) / (after[1] - before[1]) < _BUSY_SHARE:
            return
    log.warning("machine still busy after %.0f s of --wait-idle; measuring anyway", timeout_s)


# The loop ----------------------------------------------------------------------------------------


def _run(command: list[str], *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        command,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )


def _checked(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(result.args)} failed (exit {result.returncode}):\n{result.stderr[-3000:]}"
        )
    return result


def _train_command(
    root: str, steps: int, *extra: str, run: str | None = None, data: str | None = None
) -> list[str]:
    """2 torchrun processes training the demo config's tiny model; the run in ``ROOT/run`` and
    the data in ``ROOT/sim`` unless ``run`` / ``data`` say otherwise."""
    data = data or f"{root}/sim"
    return [
        str(Path(sys.executable).with_name("torchrun")),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "trainer.train",
        "--config",
        str(REPO / "trainer/configs/demo.yaml"),
        f"output_dir={run or f'{root}/run'}",
        f"data.train={data}/train",
        f"data.test={data}/test",
        *_TINY,
        f"train.steps={steps}",
        *extra,
    ]


def _export_command(run: str, out: str) -> list[str]:
    return [sys.executable, "-m", "trainer.export", "--run", run, "--out", out]


def _check_command(model: str, cache: Path) -> list[str]:
    return [
        sys.executable, "-m", "serving", "--model-dir", model, "--model-cache", str(cache), "--check"
    ]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def _service(model: str, cache: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving", "--model-dir", model, "--port", str(port)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "CTCVR_MODEL_CACHE": str(cache)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited: {proc.communicate()[1][-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the service was not ready after {timeout} s")


def run_loop(root: str, settings: Settings, work: Path) -> list[Step]:
    """simulate, train, resume, export, serve with every path under ``root``."""
    import httpx

    steps: list[Step] = []
    half = max(settings.steps // 2, 5)
    with _measured("simulate", steps):
        _checked(
            _run(
                [
                    sys.executable,
                    "-m",
                    "trainer.data",
                    "simulate",
                    "--rows",
                    str(settings.rows),
                    "--out",
                    f"{root}/sim",
                    "--seed",
                    "0",
                ]
            )
        )
    with _measured("train", steps):
        _checked(_run(_train_command(root, half, "train.evaluate=false")))
    with _measured("resume", steps) as step:
        result = _checked(_run([*_train_command(root, settings.steps), "--resume"]))
        step.detail = next(
            (ln for ln in (result.stdout + result.stderr).splitlines() if "resumed from" in ln), ""
        )
    with _measured("export", steps):
        _checked(_run(_export_command(f"{root}/run", f"{root}/model")))
    cache = work / f"cache-{uuid.uuid4().hex[:6]}"
    with _measured("serve", steps) as step, _service(f"{root}/model", cache) as (url, proc):
        start = time.perf_counter()
        _wait_ready(url, proc)
        ready = time.perf_counter() - start
        row = {"user_id": 1, "price": 10.0}
        with httpx.Client(base_url=url, timeout=30) as client:
            start = time.perf_counter()
            for _ in range(settings.requests):
                client.post("/v1/score", json={"rows": [row]}).raise_for_status()
            scoring = time.perf_counter() - start
        step.detail = f"ready after {ready:.1f} s; {settings.requests} requests in {scoring:.1f} s"
    return steps


# Faults ------------------------------------------------------------------------------------------


@dataclass
class Fault:
    case: str
    exit: int | None
    message: str  # the first ``error:`` line the command printed


def run_faults(server: Any, root: str, work: Path) -> list[Fault]:
    """Each fault case against copies of the s3:// run of :func:`run_loop` under ``root``.

    Args:
        server: the moto server (``tests.object_store.S3Server``), stopped and started again.
        root: the loop's ``s3://`` root (``ROOT/sim``, ``ROOT/run``, ``ROOT/model``).
        work: a local scratch directory.
    """
    faults: list[Fault] = []

    def record(case: str, result: subprocess.CompletedProcess, message: str = "") -> None:
        faults.append(Fault(case, result.returncode, message or _first_error(result.stderr)))
        log.info("%s: exit %s: %s", case, result.returncode, faults[-1].message)

    # The server stops in the middle of training, then comes back, and the run resumes.
    run = _copy_tree(f"{root}/run", f"{root}/outage")
    command = [
        *_train_command(root, 100_000, "train.evaluate=false", "train.checkpoint_every=5", run=run),
        "--resume",
    ]
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = _latest(run)
    deadline = time.time() + 600
    while _latest(run) <= first and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    server.stop()
    stopped = time.perf_counter()
    try:
        _, err = proc.communicate(timeout=900)
    finally:
        server.start()
    took = time.perf_counter() - stopped
    outage = subprocess.CompletedProcess(command, proc.returncode, "", err)
    record("server stopped mid-training", outage, f"{_first_error(err)} (after {took:.0f} s)")
    latest = _latest(run)
    resumed = _run([*_train_command(root, latest + 5, "train.evaluate=false", run=run), "--resume"])
    said = (resumed.stdout + resumed.stderr).splitlines()
    record(
        "server back: the same command with --resume",
        resumed,
        next((line for line in said if "resumed from" in line), _first_error(resumed.stderr)),
    )

    # Wrong credentials and a missing bucket, for each command that reaches the store.
    wrong = {"AWS_SECRET_ACCESS_KEY": "wrong-secret-for-the-benchmark"}
    nowhere = f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/bench"
    for case, env, target in (("wrong credentials", wrong, root), ("missing bucket", {}, nowhere)):
        train = _train_command(target, 5, data=f"{root}/sim")
        record(f"{case}: train", _run(train, env=env))
        record(f"{case}: export", _run(_export_command(f"{root}/run", f"{target}/m2"), env=env))
        serve = _check_command(f"{target}/model", work / "fault-cache")
        record(f"{case}: serve", _run(serve, env=env))

    # Truncated objects.
    run = _copy_tree(f"{root}/run", f"{root}/shard")
    shard = next(
        e.location.uri for e in storage.list_dir(_latest_dir(run)) if e.name.endswith(".distcp")
    )
    _truncate(shard)
    record("truncated DCP shard: export", _run(_export_command(run, f"{root}/m3")))
    record("truncated DCP shard: --resume", _run([*_train_command(root, 100, run=run), "--resume"]))
    run = _copy_tree(f"{root}/run", f"{root}/meta")
    _truncate(storage.join(_latest_dir(run), "meta.json"))
    record("truncated meta.json: --resume", _run([*_train_command(root, 100, run=run), "--resume"]))
    bad = f"{root}/model-truncated"
    _checked(_run(_export_command(f"{root}/run", bad)))
    table = next(
        e.location.uri
        for e in storage.list_dir(f"{bad}/weights/embeddings")
        if e.name.endswith(".safetensors")
    )
    _truncate(table)
    record("truncated table file: serve", _run(_check_command(bad, work / "c2")))
    storage.delete_file(f"{bad}/manifest.json")
    record("model without manifest: serve", _run(_check_command(bad, work / "c3")))
    return faults


def _first_error(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    return lines[0] if lines else (text.strip().splitlines() or [""])[-1]


def _copy_tree(source: str, target: str) -> str:
    root = storage.resolve(source)
    for entry in storage.list_dir(root, recursive=True):
        if entry.kind is storage.Kind.FILE:
            relative = entry.location.relative_to(root)
            storage.write_bytes(storage.join(target, relative), storage.read_bytes(entry.location))
    return target


def _truncate(uri: str) -> None:
    data = storage.read_bytes(uri)
    storage.write_bytes(uri, data[: len(data) // 2])


def _latest(run: str) -> int:
    pointer = f"{run}/checkpoints/latest"
    if not storage.is_file(pointer):
        return 0
    return int(storage.read_text(pointer).strip().removeprefix("step_"))


def _latest_dir(run: str) -> str:
    return storage.join(run, "checkpoints", storage.read_text(f"{run}/checkpoints/latest").strip())


# Report ------------------------------------------------------------------------------------------


def markdown(local: list[Step], remote: list[Step], faults: list[Fault], settings: Settings) -> str:
    where = settings.bucket or "moto's S3 server in this process (loopback, signature checks on)"
    heading = (
        f"Object storage: the loop on `s3://` ({where}) against local disk; {settings.rows:,} "
        f"simulated impressions, {settings.steps} training steps (2 processes), "
        f"{settings.requests} one-row requests."
    )
    lines = [
        heading,
        "",
        "| step | local s | s3 s | s3 / local | other processes' CPU share (local, s3) | s3 detail |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    busy = False
    for a, b in zip(local, remote, strict=True):
        shares = f"{_share(a)}, {_share(b)}"
        if max(a.others_cpu_share or 0.0, b.others_cpu_share or 0.0) > _BUSY_SHARE:
            shares += " (busy)"
            busy = True
        lines.append(
            f"| {a.name} | {a.seconds:.1f} | {b.seconds:.1f} | {b.seconds / a.seconds:.2f}x | "
            f"{shares} | {b.detail} |"
        )
    total_a, total_b = sum(s.seconds for s in local), sum(s.seconds for s in remote)
    lines.append(f"| **all** | {total_a:.1f} | {total_b:.1f} | {total_b / total_a:.2f}x | | |")
    lines += [
        "",
        "Verdict: "
        + (
            "inconclusive: other processes took more than 10 % of the CPUs during a step"
            if busy
            else "measured on a quiet machine"
        ),
    ]
    if faults:
        lines += ["", "| fault | exit | what it printed |", "| --- | ---: | --- |"]
        lines += [f"| {f.case} | {f.exit} | `{f.message}` |" for f in faults]
    return "\n".join(lines) + "\n"


def plot(local: list[Step], remote: list[Step], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(local))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(x - 0.2, [s.seconds for s in local], 0.4, label="local disk")
    ax.bar(x + 0.2, [s.seconds for s in remote], 0.4, label="s3://")
    ax.set_xticks(x, [s.name for s in local])
    ax.set_ylabel("seconds")
    ax.set_title("The loop on local disk and on s3://")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Entry point -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _store(settings: Settings) -> Iterator[tuple[str, Any]]:
    """The s3:// root to measure, and moto's server (None for a real store)."""
    if settings.bucket is not None:
        yield settings.bucket.rstrip("/") + f"/{uuid.uuid4().hex[:8]}", None
        return
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from tests.object_store import S3Server  # the tests' server: moto with signature checks

    server = S3Server()
    server.start()
    try:
        server.enable_authentication()
        saved = dict(os.environ)
        os.environ.update(server.environment())
        os.environ["AWS_MAX_ATTEMPTS"] = "5"  # the default, not the tests' fast-failing 2
        try:
            yield f"{server.create_bucket()}/bench", server
        finally:
            os.environ.clear()
            os.environ.update(saved)
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=30_000, help="simulated impressions")
    parser.add_argument("--steps", type=int, default=20, help="training steps (half, resume)")
    parser.add_argument("--requests", type=int, default=200, help="one-row scoring requests")
    parser.add_argument(
        "--bucket", help="s3://bucket/prefix of a real store (AWS_* set); default: moto"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument(
        "--wait-idle", type=float, default=0.0, help="wait up to this long for a quiet machine"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    settings = Settings(args.rows, args.steps, args.requests, args.bucket, args.out, args.wait_idle)
    log.info("settings: %s", asdict(settings))
    with tempfile.TemporaryDirectory(prefix="ctcvr-bench-") as scratch:
        work = Path(scratch)
        with _store(settings) as (root, server):
            if settings.wait_idle:
                _wait_for_idle(settings.wait_idle)
            local = run_loop(str(work / "local"), settings, work)
            remote = run_loop(root, settings, work)
            faults = run_faults(server, root, work) if server is not None else []
    settings.out.mkdir(parents=True, exist_ok=True)
    report = markdown(local, remote, faults, settings)
    (settings.out / "object_storage.md").write_text(report)
    plot(local, remote, settings.out / "object_storage.png")
    record = {
        "settings": {**asdict(settings), "out": str(settings.out)},
        "local": [asdict(s) for s in local],
        "s3": [asdict(s) for s in remote],
        "faults": [asdict(f) for f in faults],
    }
    (settings.out / "object_storage.json").write_text(json.dumps(record, indent=2) + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
