"""Serve a model for a moment and score a few impressions over real HTTP (``make demo``).

::

    python -m serving.demo --model-dir runs/demo/model --data runs/demo/data/test --rows 5

Starts ``python -m serving`` on a free loopback port with a throwaway bearer token, waits until
it is ready, sends the first ``--rows`` impressions of ``--data`` (raw feature values, as a client
would) to ``POST /v1/score``, prints each impression's scores next to its logged outcome, sends
the same impressions as columns to ``POST /v1/score/columns``, shows what a bad request gets back,
and stops the service. Uses only the standard library as client.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq

from schemas.artifact import SCHEMA_FILE
from schemas.features import load_schema

_SHOWN = ("user_id", "item_id", "city", "device", "recent_categories", "price")


def _show(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float) else json.dumps(value)


def _request(url: str, token: str, body: object | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url,
        data=data,
        method="POST" if data is not None else "GET",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _impressions(data: Path, model_dir: Path, count: int) -> tuple[list[dict], list[dict]]:
    """The first ``count`` rows: their feature values, and everything else (labels)."""
    schema = load_schema(model_dir / SCHEMA_FILE)
    files = sorted(data.glob("*.parquet")) if data.is_dir() else [data]
    if not files:
        raise SystemExit(f"error: no Parquet files in {data}")
    table = pq.ParquetFile(files[0]).read_row_group(0).slice(0, count)
    features = schema.sparse_names + schema.dense_names
    rows = table.select(features).to_pylist()
    others = table.select([c for c in table.column_names if c not in features]).to_pylist()
    return rows, others


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--model-dir", type=Path, required=True, help="model directory written by trainer.export"
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="Parquet impressions to take examples from"
    )
    parser.add_argument("--rows", type=int, default=5, help="impressions to score")
    args = parser.parse_args(argv)
    rows, others = _impressions(args.data, args.model_dir, args.rows)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_urlsafe(24)
    env = {
        **os.environ,
        "CTCVR_API_TOKEN": token,
        "CTCVR_HOST": "127.0.0.1",
        "CTCVR_PORT": str(port),
    }
    url = f"http://127.0.0.1:{port}"
    print(
        f"[serve-demo] starting python -m serving --model-dir {args.model_dir} on {url}", flush=True
    )
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving",
            "--model-dir",
            str(args.model_dir),
            "--log-level",
            "warning",
        ],
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                print(f"[serve-demo] the service exited with {server.returncode}", file=sys.stderr)
                return 1
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                print("[serve-demo] the service did not become ready in 120 s", file=sys.stderr)
                return 1
            time.sleep(0.2)

        status, info = _request(f"{url}/v1/model", token)
        print(
            f"[serve-demo] GET /v1/model -> {status}: version {info['version']}, trained "
            f"{info['source']['step']} steps with {info['source']['objective']}, "
            f"test CTR AUC {info['metrics'].get('ctr_auc')}"
        )
        start = time.perf_counter()
        status, body = _request(f"{url}/v1/score", token, {"rows": rows})
        elapsed = 1000 * (time.perf_counter() - start)
        print(
            f"[serve-demo] POST /v1/score with {len(rows)} impressions -> {status} in {elapsed:.1f} ms, "
            f"model {body.get('model_version')}\n"
        )
        shown = [name for name in _SHOWN if name in rows[0]]
        header = " | ".join(["#", *shown, "pCTR", "pCVR", "pCTCVR", "click", "conversion"])
        print(header)
        print("-" * len(header))
        scores = body.get("scores", [])
        for k, (row, score) in enumerate(zip(rows, scores)):
            cells = [str(k), *(_show(row.get(name)) for name in shown)]
            cells += [f"{score['pctr']:.4f}", f"{score['pcvr']:.4f}", f"{score['pctcvr']:.5f}"]
            cells += [str(others[k].get("click", "")), str(others[k].get("conversion", ""))]
            print(" | ".join(cells))
        columns = {name: [row.get(name) for row in rows] for name in rows[0]}
        status, body = _request(f"{url}/v1/score/columns", token, {"columns": columns})
        same = body.get("pctr") == [score["pctr"] for score in scores]
        print(
            f"\n[serve-demo] POST /v1/score/columns with the same impressions, one list per feature -> {status}; "
            f"pCTR {', '.join(f'{p:.4f}' for p in body.get('pctr', []))} ({'the same' if same else 'DIFFERENT'})"
        )
        bad = {"rows": [{**rows[0], "price": "cheap", "no_such_feature": 1}]}
        status, body = _request(f"{url}/v1/score", token, bad)
        print(f"\n[serve-demo] a bad request gets {status}: {json.dumps(body['detail'])}")
        return 0
    finally:
        server.terminate()
        server.wait(30)
        print("[serve-demo] service stopped")


if __name__ == "__main__":
    sys.exit(main())
