#!/usr/bin/env bash
# GPU training: one node (this machine), or several nodes under SLURM (one process per node).
#
#   launch/gpu.sh [--dry-run] local --config CONFIG --workdir DIR [-- extra args for lidit_jax.train]
#   launch/gpu.sh [--dry-run] slurm --nodes N --config CONFIG --workdir DIR [--gpus-per-node 8]
#                 [--partition P] [--time 48:00:00] [--job-name lidit] [--card h100|h200] [-- extra args]
#
# local: runs `python -m lidit_jax.train` with every GPU of this node in one process.
# slurm: writes a batch script and submits it with sbatch; srun starts one task per node, and JAX's
#   SLURM detection (lidit_jax.distributed) joins them into one runtime. The workdir must be on a
#   filesystem every node sees (checkpoints are written by all processes together). SLURM sends SIGTERM
#   before the time limit (--signal below): training saves the step it reached; resubmitting resumes.
# --card: first compile the config's train step for N nodes of that card here (python -m lidit_jax.plan
#   --topology CARD:NxGPUS --require_fit; jax's CUDA plugin, no GPU needed) and stop if it does not fit.
# --dry-run prints the command (and the batch script) instead of running it.
set -euo pipefail

DRY=0; MODE=""; NODES=1; GPUS=8; PARTITION=""; TIME="48:00:00"; JOB="lidit"; CONFIG=""; WORKDIR=""; CARD=""; EXTRA=()
usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    local|slurm) MODE="$1" ;;
    --nodes) NODES="$2"; shift ;;
    --gpus-per-node) GPUS="$2"; shift ;;
    --partition) PARTITION="$2"; shift ;;
    --time) TIME="$2"; shift ;;
    --job-name) JOB="$2"; shift ;;
    --card) CARD="$2"; shift ;;
    --config) CONFIG="$2"; shift ;;
    --workdir) WORKDIR="$2"; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ -n "$MODE" ]] || { echo "say local or slurm (see --help)" >&2; exit 2; }
[[ -n "$CONFIG" && -n "$WORKDIR" ]] || { echo "--config and --workdir are required" >&2; exit 2; }
train=(python -m lidit_jax.train --config "$CONFIG" --workdir "$WORKDIR" "${EXTRA[@]+"${EXTRA[@]}"}")

if [[ "$MODE" == local ]]; then
  if [[ "$DRY" == 1 ]]; then printf '%q ' "${train[@]}"; echo; else exec "${train[@]}"; fi
  exit 0
fi

if [[ -n "$CARD" ]]; then  # the train step compiled for the nodes here: stop before the queue if it does not fit
  overrides=(); for a in "${EXTRA[@]+"${EXTRA[@]}"}"; do [[ "$a" == --config.* ]] && overrides+=("$a"); done
  check=(python -m lidit_jax.plan --config "$CONFIG" --topology "$CARD:${NODES}x$GPUS" --require_fit
         "${overrides[@]+"${overrides[@]}"}")
  if [[ "$DRY" == 1 ]]; then printf '%q ' "${check[@]}"; echo; else "${check[@]}"; fi
fi

script=$(cat <<SBATCH
#!/usr/bin/env bash
#SBATCH --job-name=$JOB
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$GPUS
#SBATCH --time=$TIME
#SBATCH --signal=TERM@300
#SBATCH --output=$WORKDIR/slurm-%j.out
${PARTITION:+#SBATCH --partition=$PARTITION}
set -euo pipefail
cd $(pwd)
srun --kill-on-bad-exit=1 $(printf '%q ' "${train[@]}")
SBATCH
)
if [[ "$DRY" == 1 ]]; then
  echo "$script"
  echo "# then: mkdir -p $WORKDIR && sbatch <script>"
else
  mkdir -p "$WORKDIR"
  path="$WORKDIR/$JOB.sbatch"
  echo "$script" > "$path"
  sbatch "$path"
fi
