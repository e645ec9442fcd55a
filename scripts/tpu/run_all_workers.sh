#!/usr/bin/env bash
# Run the same command on every worker (host) of a Cloud TPU VM pod slice, from this repo's folder there.
# Multi-host JAX needs one process per host, all started together: this is how a preset is launched on a pod.
#
#   scripts/tpu/run_all_workers.sh TPU_NAME ZONE -- COMMAND [ARG ...]
#   scripts/tpu/run_all_workers.sh my-v4-64 us-central2-b -- \
#       DATA=gs://my-bucket/imagenet bash scripts/deit3/in1k_b16_800ep_pretrain.sh --wandb deit3
#
# Several words after -- are quoted one by one; a single word is passed as is, to be read by the remote
# shell (e.g. -- 'hostname; ls runs'). On each worker the command runs in REMOTE_DIR with the virtualenv
# that setup.sh made (.venv) active, and its output goes to the terminal and to
#   REMOTE_DIR/runs/logs/<UTC time>-worker<N>.log   on that worker.
# Environment:
#   REMOTE_DIR  the repo on the workers, relative to the home folder or absolute (default vit-recipes)
#   DETACH=1    start the command with nohup and return at once (it survives a dropped ssh connection);
#               follow it with: run_all_workers.sh TPU_NAME ZONE -- 'tail -n 5 runs/logs/*.log'
#   PROJECT     Google Cloud project (default: gcloud's configured one)
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
    exit 2
}

[[ $# -ge 4 && $3 == "--" ]] || usage
tpu_name=$1
zone=$2
shift 3
if [[ $# -eq 1 ]]; then
    command=$1
else
    command=$(printf '%q ' "$@")
fi
command -v gcloud >/dev/null || { echo "error: gcloud is not installed (https://cloud.google.com/sdk)" >&2; exit 2; }

remote_dir=${REMOTE_DIR:-vit-recipes}
stamp=$(date -u +%Y%m%d-%H%M%S)
# The worker number from the TPU VM metadata server (same on every pod generation), else the host name.
worker='$(curl -sf -m 5 -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)'
setup="cd $(printf '%q' "$remote_dir") && if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi"
setup+=" && mkdir -p runs/logs && log=runs/logs/$stamp-worker$worker.log"
if [[ ${DETACH:-0} == 1 ]]; then
    remote="$setup && { nohup bash -c $(printf '%q' "$command") >\"\$log\" 2>&1 </dev/null & }"
    remote+=" && echo \"worker $worker: started, log in \$PWD/\$log\""
else
    remote="$setup && set -o pipefail && { $command ; } 2>&1 | tee \"\$log\""
fi

gcloud_flags=(--zone "$zone" --worker=all)
if [[ -n ${PROJECT:-} ]]; then
    gcloud_flags+=(--project "$PROJECT")
fi
echo "on every worker of $tpu_name, in $remote_dir: $command" >&2
exec gcloud compute tpus tpu-vm ssh "$tpu_name" "${gcloud_flags[@]}" --command "bash -c $(printf '%q' "$remote")"
