#!/usr/bin/env bash
# `make image-test`: build the two container images on this machine and prove that they work.
#
#   1. buildah and debootstrap (installed with apt-get when missing and we are root);
#   2. the base image: $BASE_IMAGE, by default a local python:3.11-slim stand-in made by
#      deploy/base_image.sh once and kept;
#   3. both images from ./Dockerfile with cached layers (a rerun after a code change rebuilds
#      only the package layers): the trainer (target `trainer`) and the server (target
#      `server`); /opt/wheels and the host CA bundle go in when they exist; their sizes printed;
#      the server image checked to hold no trainer, torchrec, fbgemm or plotting library;
#   4. a small model: a 20k-impression simulated data set, 20 training steps, exported;
#   5. the server image's own entrypoint and command in a container with 2 worker processes (as
#      the image's user, reading the model from a read-only volume, configured by environment),
#      checked by deploy/image_check.py against in-process predictions, plus the image's
#      HEALTHCHECK command; then stopped with SIGTERM, and (overlay storage) checked to have
#      written nothing outside /tmp;
#   6. the trainer image as trainer (torchrun, 2 processes, a few steps) and exporter (int8
#      tables), the export then verified by both images' entrypoint (`--check`).
# Any failure stops the script with a message saying which step failed and the service's log.
#
# Environment:
#   PY               host interpreter for the model and the checks (default .venv/bin/python)
#   IMAGE            the trainer image to build (default localhost/ctcvr:test)
#   SERVER_IMAGE     the server image to build (default localhost/ctcvr-server:test)
#   BASE_IMAGE       its base (default localhost/ctcvr-base:bookworm, built when missing)
#   STORAGE_DRIVER   overlay where it works, else vfs (deploy/buildah_storage.sh)
#   BUILD_CA_BUNDLE  CA bundle given to pip in the build (default the host's, when present)
#   WHEELS_DIR       local wheels given to pip in the build (default /opt/wheels, when present)
#   IMAGE_TEST_DIR   where the data, model and logs go (default runs/image-test)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
py="${PY:-.venv/bin/python}"
image="${IMAGE:-localhost/ctcvr:test}"
server_image="${SERVER_IMAGE:-localhost/ctcvr-server:test}"
default_base="localhost/ctcvr-base:bookworm"
base="${BASE_IMAGE:-$default_base}"
work="${IMAGE_TEST_DIR:-runs/image-test}"
ca_bundle="${BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
wheels="${WHEELS_DIR:-/opt/wheels}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

started=$SECONDS
step() { printf '\n[image-test] (%4ds) %s\n' "$((SECONDS - started))" "$*"; }
fail() { printf '\n[image-test] FAILED: %s\n' "$*" >&2; exit 1; }
timed() {  # timed LABEL CMD...: run CMD, print how long it took
  local label="$1" t0=$SECONDS
  shift
  "$@" || fail "$label"
  printf '[image-test] %s: %ds\n' "$label" "$((SECONDS - t0))"
}

step "1/6 tools"
if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
  [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null \
    || fail "buildah and debootstrap are needed: apt-get install -y buildah debootstrap (as root)"
  echo "[image-test] apt-get install buildah debootstrap"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah debootstrap >/dev/null \
    || fail "apt-get install buildah debootstrap"
fi
[[ "$(id -u)" == 0 ]] || fail "building and running images with buildah here needs root"
[[ -x "$py" ]] || fail "no interpreter at $py (run make setup first)"
source deploy/buildah_storage.sh
buildah=(buildah --storage-driver "$STORAGE_DRIVER")
echo "[image-test] $(buildah --version), storage driver $STORAGE_DRIVER"

step "2/6 base image $base"
if [[ "$base" == "$default_base" ]]; then
  timed "base image" env BASE_IMAGE="$base" bash deploy/base_image.sh
else
  echo "[image-test] using $base as given (buildah pulls it if it is not here)"
fi

step "3/6 images $image (trainer) and $server_image (server) from Dockerfile"
build=(bud --layers --format docker --isolation chroot --build-arg "BASE_IMAGE=$base")
if [[ -d "$wheels" ]]; then
  echo "[image-test] local wheels: $wheels"
  build+=(-v "$wheels:/opt/wheels:ro" --build-arg PIP_FIND_LINKS=/opt/wheels)
fi
if [[ -f "$ca_bundle" ]]; then
  echo "[image-test] CA bundle for pip: $ca_bundle"
  build+=(-v "$ca_bundle:/etc/ssl/certs/build-ca.crt:ro" --build-arg PIP_CERT=/etc/ssl/certs/build-ca.crt)
fi
build_image() {  # build_image TARGET NAME
  local previous
  previous="$("${buildah[@]}" images --quiet --no-trunc "$2" 2>/dev/null || true)"
  timed "image build ($1)" "${buildah[@]}" "${build[@]}" --target "$1" -t "$2" .
  # The image this build replaced, if any: its last layer (the virtual environment) is used by
  # no other image. (Not `rmi --prune`: that would also drop the build stages' cached layers.)
  if [[ -n "$previous" && "$previous" != "$("${buildah[@]}" images --quiet --no-trunc "$2")" ]]; then
    "${buildah[@]}" rmi "$previous" >/dev/null 2>&1 || true
  fi
  "${buildah[@]}" images --format '[image-test] {{.Name}}:{{.Tag}} {{.ID}} {{.Size}}' "$2"
}
build_image trainer "$image"
build_image server "$server_image"
# What the server image must not hold (its build checks the same from inside).
probe="$("${buildah[@]}" from --quiet --pull=never "$server_image")"
"${buildah[@]}" run --isolation chroot "$probe" -- python -I -c '
import importlib.util, sys
import serving.main  # the service imports
found = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is not None]
sys.exit(f"the server image holds {found}" if found else 0)' \
  trainer torchrec fbgemm_gpu matplotlib sklearn omegaconf \
  || { "${buildah[@]}" rm "$probe" >/dev/null; fail "the server image holds the trainer's or the benchmarks' libraries"; }
"${buildah[@]}" rm "$probe" >/dev/null
echo "[image-test] ok: the server image imports serving and has no trainer, torchrec, fbgemm_gpu, matplotlib, sklearn, omegaconf"

step "4/6 a small trained and exported model in $work"
data="$work/data" run="$work/run" model="$work/model"
if [[ ! -f "$data/schema.yaml" ]]; then
  timed "simulate" "$py" -m trainer.data simulate --rows 20000 --out "$data" --seed 0
fi
rm -rf "$run"
timed "train (1 process, 20 steps)" "$py" -m trainer.train --config trainer/configs/demo.yaml \
  output_dir="$run" data.train="$data/train" data.test="$data/test" \
  data.batch_size=512 data.shuffle_buffer=4096 train.steps=20 train.log_every=10 train.checkpoint_every=20 \
  train.progress=false
timed "export" "$py" -m trainer.export --run "$run" --out "$model" --force
chmod -R a+rX "$work"  # the image's user is not root

step "5/6 the service in a container of $server_image, 2 worker processes"
# What the image itself says to run: ENTRYPOINT + CMD, and its HEALTHCHECK command.
image_config() {  # image_config KEY...: the items of the image config's KEY (a list or a value), one a line
  "${buildah[@]}" inspect --type image "$server_image" | "$py" -c '
import json, sys
config = json.load(sys.stdin)["Docker"]["config"]
for key in sys.argv[1:]:
    value = config
    for part in key.split("."):
        value = (value or {}).get(part)
    print(*(value if isinstance(value, list) else [value or ""]), sep="\n")' "$@"
}
out="$(image_config Entrypoint Cmd)" || fail "reading the image's entrypoint"
mapfile -t command <<<"$out"
out="$(image_config Healthcheck.Test)" || fail "reading the image's HEALTHCHECK"
mapfile -t healthcheck <<<"$out"
[[ "${healthcheck[0]}" == CMD && -n "${healthcheck[1]:-}" && -n "${command[0]}" ]] \
  || fail "the image needs an entrypoint and a HEALTHCHECK CMD (found: ${command[*]} / ${healthcheck[*]})"
healthcheck=("${healthcheck[@]:1}")
user="$(image_config User)"
echo "[image-test] entrypoint + command: ${command[*]}; user $user; healthcheck: ${healthcheck[*]}"
port="$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
token="image-test-$RANDOM$RANDOM$RANDOM"

container="" trainer_container="" server_pid="" server_status=""
service_main() {  # service_main PID: the first python process in PID's tree (python -m serving)
  local queue=("$1") pid
  while ((${#queue[@]})); do
    pid="${queue[0]}" queue=("${queue[@]:1}")
    if [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == python* ]]; then echo "$pid"; return; fi
    queue+=($(ps -o pid= --ppid "$pid" 2>/dev/null || true))
  done
}
stop_server() {  # SIGTERM to the service's main process, as `docker stop` does (buildah run would
  # SIGKILL it); with workers, the main process stops them and they drain
  [[ -n "$server_pid" ]] || return 0
  local main
  main="$(service_main "$server_pid")"
  [[ -n "$main" ]] && kill -TERM "$main" 2>/dev/null
  for _ in $(seq 90); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.5; done
  kill -KILL "$server_pid" 2>/dev/null || true
  server_status=0
  wait "$server_pid" 2>/dev/null || server_status=$?
  server_pid=""
}
cleanup() {
  stop_server
  [[ -n "$container" ]] && "${buildah[@]}" rm "$container" >/dev/null 2>&1
  [[ -n "$trainer_container" ]] && "${buildah[@]}" rm "$trainer_container" >/dev/null 2>&1
  return 0
}
trap cleanup EXIT
# The container's hostname resolves to loopback inside it, as Docker's /etc/hosts does (torchrun
# advertises its store under the hostname).
container="$("${buildah[@]}" from --quiet --pull=never --add-host ctcvr-test:127.0.0.1 "$server_image")"
trainer_container="$("${buildah[@]}" from --quiet --pull=never --add-host ctcvr-test:127.0.0.1 "$image")"
in_container=("${buildah[@]}" run --isolation chroot --hostname ctcvr-test)

uid="$("${in_container[@]}" "$container" -- id -u)"
[[ "$uid" != 0 ]] || fail "the image runs as root"
echo "[image-test] the image runs as uid $uid"

# The host network is shared with the container: listen on loopback only.
workers=2
"${in_container[@]}" -v "$repo/$model:/models/current:ro" -e CTCVR_HOST=127.0.0.1 \
  -e "CTCVR_PORT=$port" -e "CTCVR_API_TOKEN=$token" -e "CTCVR_WORKERS=$workers" \
  "$container" -- "${command[@]}" >"$work/server.log" 2>&1 &
server_pid=$!
if ! "$py" deploy/image_check.py --url "http://127.0.0.1:$port" --token "$token" --model-dir "$model" \
    --data "$data/test" --server-pid "$server_pid"; then
  echo "---- service log ($work/server.log) ----" >&2
  tail -40 "$work/server.log" >&2
  fail "the service in the image did not pass deploy/image_check.py"
fi
"${in_container[@]}" -e "CTCVR_PORT=$port" "$container" -- "${healthcheck[@]}" \
  || fail "the image's HEALTHCHECK command failed against the ready service"
echo "[image-test] ok: HEALTHCHECK (${healthcheck[*]}) -> 0"
stop_server
# Every worker drains and shuts down, then the main process ends (buildah run reports 1).
[[ "$(grep -c "Application shutdown complete" "$work/server.log")" == "$workers" ]] \
  || { tail -20 "$work/server.log" >&2; fail "the service did not shut down gracefully on SIGTERM (status $server_status)"; }
if "${in_container[@]}" -e "CTCVR_PORT=$port" "$container" -- "${healthcheck[@]}" 2>/dev/null; then
  fail "the service still answers after SIGTERM"
fi
echo "[image-test] ok: SIGTERM -> graceful shutdown; HEALTHCHECK now fails as it should"
if [[ "$STORAGE_DRIVER" == overlay ]]; then
  # The container's own layer holds whatever the service wrote outside its volumes: nothing but
  # /tmp may be there (deploy/k8s runs it with a read-only root filesystem and /tmp as emptyDir).
  upper="$(dirname "$("${buildah[@]}" mount "$container")")/diff"
  written="$(find "$upper" -type f ! -path "$upper/tmp/*" ! -path "$upper/etc/hosts" \
    ! -path "$upper/etc/hostname" ! -path "$upper/etc/resolv.conf" | sed "s#^$upper##")"  # runtime files
  "${buildah[@]}" umount "$container" >/dev/null
  [[ -z "$written" ]] || fail "the service wrote into the image's filesystem: $written"
  echo "[image-test] ok: the service wrote no file outside /tmp (a read-only root filesystem suits it)"
fi

step "6/6 the trainer image as trainer and exporter (torchrun, 2 processes, 4 steps; int8 tables)"
rm -rf "$work/in-image" && mkdir -p "$work/in-image/models" && chown -R "$uid" "$work/in-image"
timed "train in the trainer image" timeout 600 "${in_container[@]}" \
  -v "$repo/$data:/data:ro" -v "$repo/$work/in-image:/runs" "$trainer_container" -- \
  torchrun --standalone --nproc-per-node=2 -m trainer.train --config configs/demo.yaml \
  output_dir=/runs/run data.train=/data/train data.test=/data/test data.batch_size=256 \
  data.shuffle_buffer=1024 train.steps=4 train.log_every=2 train.checkpoint_every=4 train.progress=false
timed "export in the trainer image" timeout 300 "${in_container[@]}" \
  -v "$repo/$work/in-image:/runs:ro" -v "$repo/$work/in-image/models:/models" \
  "$trainer_container" -- python -m trainer.export --run /runs/run --out /models/current --quantize int8
for checked in "$trainer_container" "$container"; do
  timed "check the export with the entrypoint of $("${buildah[@]}" inspect --format '{{.FromImage}}' "$checked")" \
    timeout 300 "${in_container[@]}" -v "$repo/$work/in-image/models:/models:ro" \
    "$checked" -- "${command[0]}" --check
done

step "passed in $((SECONDS - started)) s"
