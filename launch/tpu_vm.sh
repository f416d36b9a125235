#!/usr/bin/env bash
# Cloud TPU VM slices: create, install on every worker, train / sample, stop (checkpointing), copy back, delete.
#
#   launch/tpu_vm.sh [--dry-run] COMMAND --name NAME --zone ZONE [options] [-- extra args for lidit_jax]
#
# COMMAND: create | install | train | sample | stop | status | copy | delete
# options: --type v5p-128 (accelerator type)  --version v2-alpha-tpuv5 (TPU software version)
#          --project PROJECT  --spot (preemptible capacity)
#          --repo URL --branch main (install from git; default: copy this checkout's HEAD to every worker)
#          --config configs/lidit_1b.py  --workdir gs://BUCKET/runs/NAME (Orbax writes to GCS directly)
#          --out DIR (copy: where results land locally)
#          --skip-check (create / train: do not compile the config for --type here first)
# Every worker runs the same command (--worker=all); JAX finds the other workers by itself
# (lidit_jax.distributed), each feeds its slice of the batch, worker 0 writes metrics and images.
# `stop` sends SIGTERM: training saves a checkpoint at the step it reached and exits; `train` again resumes.
# create and train first compile the config's train step for --type on this machine (python -m lidit_jax.plan
# --topology TYPE --require_fit; libtpu, no TPU needed) and stop if it does not fit the chips' HBM: fail before
# paying for the slice. --dry-run prints the commands instead of running them.
set -euo pipefail

DRY=0; CMD=""; NAME=""; ZONE=""; TYPE="v5p-128"; VERSION="v2-alpha-tpuv5"; PROJECT=""; SPOT=0
REPO=""; BRANCH="main"; CONFIG="configs/lidit_1b.py"; WORKDIR=""; CHECK=1
OUT="./results"; EXTRA=()

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --name) NAME="$2"; shift ;;
    --zone) ZONE="$2"; shift ;;
    --type) TYPE="$2"; shift ;;
    --version) VERSION="$2"; shift ;;
    --project) PROJECT="$2"; shift ;;
    --spot) SPOT=1 ;;
    --skip-check) CHECK=0 ;;
    --repo) REPO="$2"; shift ;;
    --branch) BRANCH="$2"; shift ;;
    --config) CONFIG="$2"; shift ;;
    --workdir) WORKDIR="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    create|install|train|sample|stop|status|copy|delete) CMD="$1" ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ -n "$CMD" ]] || { echo "no COMMAND given (see --help)" >&2; exit 2; }
[[ -n "$NAME" && -n "$ZONE" ]] || { echo "--name and --zone are required" >&2; exit 2; }
if [[ "$CMD" == train || "$CMD" == sample ]] && [[ -z "$WORKDIR" ]]; then
  echo "--workdir is required for $CMD (e.g. gs://BUCKET/runs/$NAME)" >&2; exit 2
fi

run() {  # print (dry run) or execute a command given as separate words
  if [[ "$DRY" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
common=(--zone "$ZONE"); [[ -n "$PROJECT" ]] && common+=(--project "$PROJECT")
on_all() { run gcloud compute tpus tpu-vm ssh "$NAME" "${common[@]}" --worker=all --command "$1"; }
extra=""; for a in "${EXTRA[@]+"${EXTRA[@]}"}"; do extra+=" $(printf '%q' "$a")"; done
overrides=(); for a in "${EXTRA[@]+"${EXTRA[@]}"}"; do [[ "$a" == --config.* ]] && overrides+=("$a"); done
check_fit() {  # the config's train step compiled for the slice here: stop before the slice if it does not fit
  [[ "$CHECK" == 1 ]] || return 0
  run python -m lidit_jax.plan --config "$CONFIG" --topology "$TYPE" --require_fit "${overrides[@]+"${overrides[@]}"}"
}

case "$CMD" in
  create)
    flags=(--accelerator-type "$TYPE" --version "$VERSION"); [[ "$SPOT" == 1 ]] && flags+=(--spot)
    check_fit
    run gcloud compute tpus tpu-vm create "$NAME" "${common[@]}" "${flags[@]}" ;;
  install)
    if [[ -n "$REPO" ]]; then
      on_all "set -e; rm -rf lidit_jax; git clone -q -b $BRANCH $REPO lidit_jax; pip install -q -e 'lidit_jax[tpu]'"
    else
      tarball="/tmp/lidit_jax_$NAME.tar.gz"
      run git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$tarball" HEAD
      run gcloud compute tpus tpu-vm scp "${common[@]}" --worker=all "$tarball" "$NAME:lidit_jax.tar.gz"
      on_all "set -e; rm -rf lidit_jax; mkdir lidit_jax; tar -xzf lidit_jax.tar.gz -C lidit_jax; pip install -q -e 'lidit_jax[tpu]'"
    fi ;;
  train)
    check_fit
    on_all "cd lidit_jax && nohup python -m lidit_jax.train --config $CONFIG --workdir $WORKDIR$extra > train.log 2>&1 &" ;;
  sample)
    on_all "cd lidit_jax && python -m lidit_jax.sample --config $CONFIG --workdir $WORKDIR$extra" ;;
  stop)
    on_all "pkill -TERM -f lidit_jax.train || true" ;;
  status)
    run gcloud compute tpus tpu-vm ssh "$NAME" "${common[@]}" --worker=0 --command "tail -n 5 lidit_jax/train.log" ;;
  copy)
    run mkdir -p "$OUT"
    run gcloud compute tpus tpu-vm scp "${common[@]}" --worker=0 "$NAME:lidit_jax/train.log" "$OUT/"
    if [[ "$WORKDIR" == gs://* ]]; then
      run gcloud storage cp -r "$WORKDIR/metrics.jsonl" "$WORKDIR/samples" "$OUT/"
    elif [[ -n "$WORKDIR" ]]; then
      run gcloud compute tpus tpu-vm scp "${common[@]}" --worker=0 --recurse "$NAME:$WORKDIR" "$OUT/"
    fi ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$NAME" "${common[@]}" --quiet ;;
esac
