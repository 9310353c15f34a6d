#!/bin/sh
# Entry point of the ctcvr image.
#   (no arguments) | serve [FLAGS]  -> python -m serving [FLAGS]: serves $CTCVR_MODEL_DIR, or
#                                      follows $CTCVR_MODEL_REPOSITORY; /models/current when
#                                      neither they nor --model-dir / --repository say otherwise
#   --FLAG ...                      -> python -m serving --FLAG ...  (e.g. --model-dir /models/b)
#   healthcheck                     -> exit 0 when the local service answers GET /readyz with 200
#   anything else                   -> run as given, e.g. torchrun ... -m trainer.train ...
set -eu

# The default model directory, unless the variables or the flags name a model.
default_model() {
  for arg in "$@"; do
    case "$arg" in --model-dir|--model-dir=*|--repository|--repository=*) return 0 ;; esac
  done
  if [ -z "${CTCVR_MODEL_DIR:-}" ] && [ -z "${CTCVR_MODEL_REPOSITORY:-}" ]; then
    export CTCVR_MODEL_DIR=/models/current
  fi
}

case "${1:-serve}" in
  serve)
    [ "$#" -gt 0 ] && shift
    default_model "$@"
    exec python -m serving "$@" ;;
  -*)
    default_model "$@"
    exec python -m serving "$@" ;;
  healthcheck)
    exec python -c 'import os, sys, urllib.request
url = "http://127.0.0.1:%s/readyz" % os.environ.get("CTCVR_PORT", "8000")
try:
    sys.exit(0 if urllib.request.urlopen(url, timeout=3).status == 200 else 1)
except Exception as err:  # refused, 503 (no model), timeout
    print(f"{url}: {err}", file=sys.stderr)
    sys.exit(1)' ;;
  *)
    exec "$@" ;;
esac
