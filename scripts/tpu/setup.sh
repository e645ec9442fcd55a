#!/usr/bin/env bash
# Install vit-recipes on every worker of a Cloud TPU VM pod slice: copy this checkout to each worker, make a
# virtualenv there (.venv) and install requirements.txt with CPU-only PyTorch (data loading, timm transforms)
# and jax[tpu]. Run it from your machine, in this checkout (it needs git and gcloud):
#
#   scripts/tpu/setup.sh TPU_NAME ZONE
#   scripts/tpu/setup.sh my-v4-64 us-central2-b
#
# Then launch presets with scripts/tpu/run_all_workers.sh, which activates the virtualenv. Run setup.sh again
# after changing the code: it recopies the tracked and untracked (not ignored) files and keeps the virtualenv.
# On one machine (a worker, a single-host TPU VM), `scripts/tpu/setup.sh --local` does the install step only,
# in the checkout the script is in.
# Environment: REMOTE_DIR (the repo on the workers, relative to the home folder or absolute; default
# vit-recipes), PROJECT (Google Cloud project; default gcloud's configured one).
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
    exit 2
}

repo=$(cd "$(dirname "$0")/../.." && pwd)

install_here() {
    cd "$repo"
    # TPU VM images ship python3 without the venv module.
    if ! python3 -m venv .venv; then
        sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv
        python3 -m venv .venv
    fi
    . .venv/bin/activate
    python -m pip install -q -U pip
    # CPU wheels: PyTorch only feeds the data pipeline on a TPU host (the default wheels carry CUDA, ~2 GB).
    python -m pip install -q torch torchvision --index-url https://download.pytorch.org/whl/cpu
    python -m pip install -q -r requirements.txt
    python -m pip install -q -U "jax[tpu]" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
    python -c "import jax, flax, optax, timm, torch; print(f'{jax.__version__=} {flax.__version__=} {torch.__version__=}')"
}

if [[ $# -eq 1 && $1 == "--local" ]]; then
    install_here
    exit 0
fi
[[ $# -eq 2 && $1 != -* ]] || usage
tpu_name=$1
zone=$2
command -v gcloud >/dev/null || { echo "error: gcloud is not installed (https://cloud.google.com/sdk)" >&2; exit 2; }
git -C "$repo" rev-parse --git-dir >/dev/null 2>&1 || { echo "error: $repo is not a git checkout" >&2; exit 2; }

remote_dir=${REMOTE_DIR:-vit-recipes}
gcloud_flags=(--zone "$zone" --worker=all)
if [[ -n ${PROJECT:-} ]]; then
    gcloud_flags+=(--project "$PROJECT")
fi

# 1. The checkout's files (tracked and untracked, not ignored: no .venv, runs/, caches) to every worker.
archive=$(mktemp -d)/vit-recipes.tar.gz
trap 'rm -rf "$(dirname "$archive")"' EXIT
(cd "$repo" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf "$archive")
echo "copying $(du -h "$archive" | cut -f1) to every worker of $tpu_name ($remote_dir)" >&2
gcloud compute tpus tpu-vm scp "$archive" "$tpu_name:vit-recipes.tar.gz" "${gcloud_flags[@]}"
unpack="mkdir -p $(printf '%q' "$remote_dir") && tar -xzf vit-recipes.tar.gz -C $(printf '%q' "$remote_dir")"
gcloud compute tpus tpu-vm ssh "$tpu_name" "${gcloud_flags[@]}" \
    --command "bash -c $(printf '%q' "$unpack && rm vit-recipes.tar.gz")"

# 2. The install, on every worker at once, each logging to runs/logs/ there.
REMOTE_DIR=$remote_dir "$repo/scripts/tpu/run_all_workers.sh" "$tpu_name" "$zone" -- bash scripts/tpu/setup.sh --local
