"""Two real service processes (uvicorn, loopback) following one model repository, on the local disk
and on the S3 server, under a bounded load loop that scores on both without pause:

* a newly published version is served by both within two poll intervals, and no request fails;
* a rollback brings both back;
* a corrupt version (a table file truncated in the store, its manifest intact) is refused by
  both, which keep serving; /readyz, /metrics and the log say which version and why, and it is
  not tried again while the pointer stays.

The convergence times are printed (``pytest -s``) for the record.
"""

from __future__ import annotations

import re
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from schemas.repository import ModelRepository
from tests.serving.artifacts import serving_process, truncated_copy
from trainer.models import main as models_main
from trainer.publish import publish

pytestmark = pytest.mark.distributed  # several processes

POLL_SECONDS = 5.0
REPLICAS = 2


@dataclass
class Load:
    """Clients scoring on every replica without pause until stopped: one thread per replica."""

    urls: list[str]
    rows: list[dict]
    stop: threading.Event = field(default_factory=threading.Event)
    failures: list[str] = field(default_factory=list)
    responses: list[tuple[float, int, str]] = field(default_factory=list)  # time, replica, version
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for replica, url in enumerate(self.urls):
            thread = threading.Thread(target=self._run, args=(replica, url), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _run(self, replica: int, url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            i = 0
            while not self.stop.is_set():
                rows = self.rows[(i * 7) % len(self.rows) :][:8] or self.rows[:8]
                i += 1
                try:
                    response = client.post("/v1/score", json={"rows": rows})
                except httpx.HTTPError as err:
                    self.failures.append(f"replica {replica}: {type(err).__name__}: {err}")
                    continue
                if response.status_code != 200:
                    self.failures.append(
                        f"replica {replica}: {response.status_code} {response.text}"
                    )
                    continue
                self.responses.append((time.time(), replica, response.json()["model_version"]))
                time.sleep(0.02)  # bounded: about 50 requests per second per replica at most

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def served(url: str) -> str:
    return httpx.get(f"{url}/v1/model", timeout=30).json()["version"]


def wait_for(urls: list[str], version: str, since: float, limit: float) -> list[float]:
    """Seconds from ``since`` until each replica serves ``version`` (polled every 20 ms)."""
    seen: dict[int, float] = {}
    deadline = since + limit + 30  # measure beyond the limit, so a slow replica is reported
    while len(seen) < len(urls) and time.time() < deadline:
        for i, url in enumerate(urls):
            if i not in seen and served(url) == version:
                seen[i] = time.time() - since
        time.sleep(0.02)
    assert len(seen) == len(urls), f"not every replica served {version}: {seen}"
    return [seen[i] for i in range(len(urls))]


def metric(url: str, name: str, **labels: str) -> float | None:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = rf"^{re.escape(name)}{re.escape('{' + selector + '}') if labels else ''} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match[1]) if match else None


@pytest.fixture(params=["local", "s3"])
def repository(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "repo")
    return request.getfixturevalue("s3").uri("models")


def test_two_replicas_follow_publish_rollback_and_refuse_a_corrupt_version(
    repository, edge_model, edge_model_b, tmp_path
):
    repo = ModelRepository(repository)
    publish(edge_model.model, repository, log=None)
    logs = [tmp_path / f"replica{i}.log" for i in range(REPLICAS)]
    with ExitStack() as stack:
        urls = [
            stack.enter_context(
                serving_process(
                    ["--repository", repository, "--poll-seconds", str(POLL_SECONDS)],
                    logs[i],
                    env={"CTCVR_MODEL_CACHE": str(tmp_path / f"cache{i}")},
                )
            )
            for i in range(REPLICAS)
        ]
        assert [served(url) for url in urls] == [edge_model.version] * REPLICAS
        load = Load(urls, edge_model.rows)
        load.start()
        try:
            time.sleep(POLL_SECONDS)  # load on both before anything changes

            # A new version: both serve it within two poll intervals.
            published = publish(edge_model_b.model, repository, log=None)
            moved = published.pointer.updated_at.timestamp()
            to_new = wait_for(urls, edge_model_b.version, moved, 2 * POLL_SECONDS)

            # A rollback: both go back.
            assert models_main(["rollback", "--repository", repository]) == 0
            moved = repo.read_pointer().pointer.updated_at.timestamp()
            back = wait_for(urls, edge_model.version, moved, 2 * POLL_SECONDS)

            # A corrupt version made current behind the publisher's back: both refuse it.
            corrupt = truncated_copy(edge_model_b.model, tmp_path / "corrupt", version="corrupt-1")
            repo.upload(corrupt)
            repo.promote("corrupt-1")
            time.sleep(2 * POLL_SECONDS + 1)
            readiness = [httpx.get(f"{url}/readyz", timeout=30) for url in urls]
            refused = [metric(url, "ctcvr_repository_refused_versions_total") for url in urls]
            time.sleep(2 * POLL_SECONDS)  # more polls: the same version is not tried again
            refused_later = [metric(url, "ctcvr_repository_refused_versions_total") for url in urls]
            still = [served(url) for url in urls]
        finally:
            load.finish()

    print(
        f"\n[{repo.root.scheme or 'local'}] poll {POLL_SECONDS} s; publish -> both replicas: "
        f"{', '.join(f'{t:.2f} s' for t in to_new)}; rollback -> both: "
        f"{', '.join(f'{t:.2f} s' for t in back)}; {len(load.responses)} requests, "
        f"{len(load.failures)} failed"
    )
    assert max(to_new) <= 2 * POLL_SECONDS, to_new
    assert max(back) <= 2 * POLL_SECONDS, back
    assert not load.failures, load.failures[:5]
    assert {version for _, _, version in load.responses} == {
        edge_model.version,
        edge_model_b.version,
    }
    # Both replicas took traffic on both versions.
    for replica in range(REPLICAS):
        versions = {v for _, r, v in load.responses if r == replica}
        assert versions == {edge_model.version, edge_model_b.version}, (replica, versions)

    assert still == [edge_model.version] * REPLICAS
    for response, log in zip(readiness, logs):
        body = response.json()
        assert response.status_code == 200 and body["model_version"] == edge_model.version
        assert body["detail"].startswith(f"repository {repo.uri}: version corrupt-1 refused")
        assert "checksum mismatch" in body["detail"]
        lines = [
            line for line in log.read_text().splitlines() if "refused version corrupt-1" in line
        ]
        assert len(lines) == 1 and "checksum mismatch" in lines[0], log.read_text()[-3000:]
        print(f"[{repo.root.scheme or 'local'}] {Path(log).name}: {lines[0]}")
    print(f"[{repo.root.scheme or 'local'}] /readyz: {readiness[0].json()}")
    assert refused == refused_later == [1.0] * REPLICAS
