"""Check a running scoring service against this machine's own predictions (``make image-test``).

::

    python deploy/image_check.py --url http://127.0.0.1:PORT --model-dir DIR --data DATA/test \\
        [--token TOKEN] [--rows 64] [--server-pid PID]

Waits until ``GET /readyz`` answers 200 (giving up at once if ``--server-pid`` exits), then checks
``/healthz``, that ``/v1/model`` serves the model directory's version, that ``POST /v1/score`` of
``--rows`` logged impressions returns the scores ``serving``'s own loader computes here in
process on the same directory (within 1e-5), that a bad row is refused with a 422 naming it,
that ``/v1/*`` refuses a missing token when one is set, and that ``/metrics`` counted the rows.
Prints one line per check; exits 1 naming the first check that failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from serving.artifact import load_artifact
from serving.scorer import Scorer

TOLERANCE = 1e-5


class CheckFailed(RuntimeError):
    pass


def _call(url: str, token: str | None = None, body: object | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers=headers, method="GET" if data is None else "POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise CheckFailed(what)
    print(f"[image-check] ok: {what.split(':')[0]}", flush=True)


def wait_ready(url: str, timeout: float, server_pid: int | None) -> float:
    start = time.monotonic()
    while True:
        if server_pid is not None and not _alive(server_pid):
            raise CheckFailed(
                f"the service process {server_pid} exited before {url}/readyz answered"
            )
        try:
            if _call(f"{url}/readyz")[0] == 200:
                return time.monotonic() - start
        except OSError:  # not listening yet
            pass
        if time.monotonic() - start > timeout:
            raise CheckFailed(f"{url}/readyz did not answer 200 within {timeout:.0f} s")
        time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def impressions(data: Path, feature_names: list[str], count: int) -> list[dict]:
    """The first ``count`` logged impressions of ``data`` as request rows (raw feature values)."""
    files = sorted(data.glob("*.parquet")) if data.is_dir() else [data]
    if not files:
        raise CheckFailed(f"no Parquet files in {data}")
    rows = pq.read_table(files[0], columns=feature_names).slice(0, count).to_pylist()
    if len(rows) < count:
        raise CheckFailed(f"{files[0]} has {len(rows)} rows, fewer than the {count} asked for")
    return rows


def run_checks(args: argparse.Namespace) -> None:
    url = args.url.rstrip("/")
    waited = wait_ready(url, args.timeout, args.server_pid)
    print(f"[image-check] ok: GET /readyz -> 200 after {waited:.1f} s", flush=True)
    _expect(_call(f"{url}/healthz")[0] == 200, "GET /healthz -> 200")

    artifact = load_artifact(args.model_dir)
    status, body = _call(f"{url}/v1/model", args.token)
    served = json.loads(body).get("version") if status == 200 else None
    _expect(
        served == artifact.version,
        f"GET /v1/model serves {artifact.version}: got {status} {body[:200]!r}",
    )

    rows = impressions(
        args.data, artifact.schema.sparse_names + artifact.schema.dense_names, args.rows
    )
    request = {"rows": rows}
    scorer = Scorer(artifact, max_rows=max(len(rows), 1))
    expected = scorer.predict(scorer.prepare(json.dumps(request).encode()))
    status, body = _call(f"{url}/v1/score", args.token, request)
    _expect(
        status == 200, f"POST /v1/score of {len(rows)} rows -> 200: got {status} {body[:300]!r}"
    )
    answer = json.loads(body)
    got = np.array(
        [[s["pctr"], s["pcvr"], s["pctcvr"]] for s in answer["scores"]], dtype=np.float64
    )
    _expect(
        answer["model_version"] == artifact.version,
        f"the scores name model {artifact.version}: got {answer['model_version']}",
    )
    _expect(
        got.shape == expected.shape,
        f"one score per row: got {got.shape}, expected {expected.shape}",
    )
    worst = float(np.max(np.abs(got - expected)))
    _expect(
        worst <= TOLERANCE,
        f"scores equal the in-process ones within {TOLERANCE:g} (max difference {worst:.2e})",
    )
    _expect(float(np.ptp(expected[:, 0])) > 1e-4, "the compared scores are not all alike")
    print(
        f"[image-check]     max |service - in-process| = {worst:.2e} over {got.size} values",
        flush=True,
    )

    bad = {"rows": [rows[0], {**rows[1], "no_such_feature": 1}]}
    status, body = _call(f"{url}/v1/score", args.token, bad)
    locs = [item.get("loc") for item in json.loads(body).get("detail", [])] if status == 422 else []
    _expect(
        ["body", "rows", 1, "no_such_feature"] in locs,
        f"a bad row -> 422 naming it: got {status} {body[:300]!r}",
    )
    if args.token:
        _expect(_call(f"{url}/v1/score", None, request)[0] == 401, "no bearer token -> 401")
    status, body = _call(f"{url}/metrics")
    _expect(status == 200 and b"ctcvr_score_rows_total" in body, "GET /metrics counts scored rows")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python deploy/image_check.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--url", required=True, help="base URL of the running service")
    parser.add_argument(
        "--model-dir", type=Path, required=True, help="the model directory the service serves"
    )
    parser.add_argument("--data", type=Path, required=True, help="Parquet impressions to score")
    parser.add_argument("--token", help="the service's CTCVR_API_TOKEN, if it has one")
    parser.add_argument("--rows", type=int, default=64, help="impressions to score (default 64)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for /readyz")
    parser.add_argument("--server-pid", type=int, help="stop waiting if this process exits")
    args = parser.parse_args(argv)
    try:
        run_checks(args)
    except CheckFailed as err:
        print(f"[image-check] FAILED: {err}", file=sys.stderr)
        return 1
    print("[image-check] all checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
