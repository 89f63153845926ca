#!/usr/bin/env bash
# The runbook (cluster/README.md) rehearsed on one machine, as far as one machine allows: a moto S3 server on
# 127.0.0.1 stands in for the bucket, a head (`ray start --head`) and a worker node (`ray start --address`) on
# loopback stand in for the launcher's nodes, token auth on. Each step runs the runbook's own command with the
# cloud parts swapped out (small step counts, CPU, 1 CPU per node), in the runbook's order:
#   1. token          2. prepare data to $STORE   3. nodes up   4. dry-run, then nlt and le on 2 nodes
#   5. a worker node dies mid-stage; the same command resubmitted   6. fetch the checkpoint and evaluate
#   7. tear down (by process group: `ray stop` would kill every Ray process on the machine)
#
# Usage: bash cluster/rehearse.sh [WORK_DIR]      (default /tmp/ccr-rehearsal; about 12 minutes on 2 cores)
# Needs the dev install (`make setup`: moto[server] is in the dev extra). Binds only 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
WORK=${1:-/tmp/ccr-rehearsal}
VENV_BIN=$(cd "$(dirname "${PYTHON:-.venv/bin/python}")" && pwd)
export PATH="$VENV_BIN:$PATH"
rm -rf "$WORK" && mkdir -p "$WORK/home"
free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
step() { printf '\n=== %s (%s)\n' "$1" "$(date +%T)"; }
PGIDS=()
teardown() {
    step "7. tear down"
    for pg in "${PGIDS[@]}"; do kill -TERM -- "-$pg" 2>/dev/null || true; done
    sleep 3
    for pg in "${PGIDS[@]}"; do kill -KILL -- "-$pg" 2>/dev/null || true; done
    echo "stopped ${#PGIDS[@]} process groups; the bucket's objects died with the S3 server, $WORK stays"
}
trap teardown EXIT

# A private HOME: the token lives in HOME/.ccr-ray/auth as on the launcher's nodes; nothing touches the real ~.
export HOME=$WORK/home RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset RAY_ADDRESS
# The bucket: S3 on loopback. pyarrow and boto3 both read AWS_ENDPOINT_URL, so $STORE has the runbook's form.
export AWS_ACCESS_KEY_ID=rehearsal AWS_SECRET_ACCESS_KEY=rehearsal AWS_DEFAULT_REGION=us-east-1
S3_PORT=$(free_port)
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export BUCKET=ccr-rehearsal
export STORE=s3://$BUCKET/ccr-ray
setsid moto_server -H 127.0.0.1 -p "$S3_PORT" >"$WORK/s3.log" 2>&1 &
PGIDS+=($!)
for _ in $(seq 60); do python -c "import socket; socket.create_connection(('127.0.0.1', $S3_PORT), 1)" 2>/dev/null && break; sleep 0.5; done
python -c "import boto3; boto3.client('s3').create_bucket(Bucket='$BUCKET')"
echo "S3 on $AWS_ENDPOINT_URL, bucket $BUCKET"

step "1. the cluster's auth token"
(umask 077 && mkdir -p ~/.ccr-ray/auth && \
    python -c 'import secrets; print(secrets.token_hex(32), end="")' > ~/.ccr-ray/auth/auth_token)
ls -l ~/.ccr-ray/auth/auth_token

step "2. prepare data to shared storage"
# Real text straight to the bucket (runbook section 2; no images exist here, so Multi30K goes without them)...
python jobs/prepare_data.py multi30k --multi30k ../shared/data/multi30k --images-as none --no-task2 \
    --splits train,val --languages en,de --out "$STORE/data/multi30k-text"
# ...and the demo's scenes (with images) made locally, then synced up as `aws s3 sync` would.
python jobs/make_demo_data.py --out "$WORK/demo" --train 2048 --val 128 --test 128 --image-size 32 --shard-size 512
python -c "from ccr_ray.storage import Location; Location.of('$STORE/data/demo').upload_from('$WORK/demo')"
python -c "from ccr_ray.storage import Location; print('on S3:', sorted(Location.of('$STORE/data').children()))"

step "3. the nodes: a head and a worker on loopback, token auth on (aws.yaml's start commands)"
GCS_PORT=$(free_port) DASH_PORT=$(free_port)
RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$HOME/.ccr-ray/auth/auth_token setsid ray start --head --block \
    --node-ip-address=127.0.0.1 --port="$GCS_PORT" --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" \
    --dashboard-agent-listen-port="$(free_port)" --num-cpus=1 --temp-dir="$WORK/ray-head" --disable-usage-stats \
    >"$WORK/head.log" 2>&1 &
PGIDS+=($!)
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$HOME/.ccr-ray/auth/auth_token   # the client side
ADDRESS=http://127.0.0.1:$DASH_PORT
for _ in $(seq 60); do ray job list --address "$ADDRESS" >/dev/null 2>&1 && break; sleep 2; done
start_worker() {
    setsid ray start --block --address="127.0.0.1:$GCS_PORT" --node-ip-address=127.0.0.1 --num-cpus=1 \
        --dashboard-agent-listen-port="$(free_port)" --disable-usage-stats >>"$WORK/worker.log" 2>&1 &
    WORKER_PG=$!
    PGIDS+=("$WORKER_PG")
}
wait_nodes() {
    for _ in $(seq 60); do
        n=$(ray list nodes --address "$ADDRESS" --format json 2>/dev/null \
            | python -c 'import json,sys; print(sum(n["state"] == "ALIVE" for n in json.load(sys.stdin)))' || echo 0)
        [ "$n" -ge "$1" ] && break
        sleep 2
    done
    echo "alive nodes: $n"
}
start_worker
wait_nodes 2
ray status --address "127.0.0.1:$GCS_PORT" | sed -n '/Resources/,$p' | head -8

# The runbook's stage commands with the demo config; one Train worker on each node (STRICT_SPREAD), 0.5 CPU each
# so that Ray Data keeps a CPU (the 2-core deadlock in ../shared/notes/platform.md).
COMMON=(--config demo --set "run.home=$WORK/home/ccr_ray" --set "run.storage=$STORE/runs" --set run.experiment=rehearsal
        --set "data.pretrain=$STORE/data/demo" --set "data.downstream=$STORE/data/demo" --set data.val_max_images=128
        --set data.feature_cache=true --set "data.feature_cache_dir=$STORE/cache" --set run.max_failures=3
        --set train.batch_size=32 --set scaling.cpus_per_worker=0.5 --set scaling.placement_strategy=STRICT_SPREAD)
submit() {
    ray job submit --address "$ADDRESS" --runtime-env cluster/runtime_env.yaml --working-dir . -- \
        python jobs/train_stage.py "$@" "${COMMON[@]}"
}

step "4. dry run, then each stage on two nodes"
# clip stands in for the downloaded CLIP weights the real config reads from /models, so it is the first stage
submit --stage clip --num-workers 2 --dry-run 2>&1 | grep -vE " (INFO|WARNING) " | tail -12
submit --stage clip --num-workers 2 --set train.max_steps=60 --set train.eval_every=30 2>&1 | grep -E "^\[|succeeded|failed" | tail -6
submit --stage nlt --num-workers 2 --set train.max_steps=60 --set train.eval_every=30 2>&1 | grep -E "^\[|succeeded|failed" | tail -6

step "5. a worker node dies mid-stage; a replacement joins; the same command again if the job gave up"
submit --stage le --num-workers 2 --set train.max_steps=120 --set train.eval_every=20 >"$WORK/le-1.log" 2>&1 &
SUBMIT=$!
python - "$STORE/runs/rehearsal/ray" <<'EOF' || true
# wait for the first checkpoint Train registers for le (a checkpoint_* folder in its run folder on S3)
import sys, time
from ccr_ray.storage import Location
runs = Location.of(sys.argv[1])
deadline = time.time() + 600
while time.time() < deadline:
    names = [n for n in (runs.children() if runs.exists() else []) if n.startswith("le-")]
    if names and any(c.startswith("checkpoint_") for c in (runs / names[0]).children()):
        print("le has a checkpoint in", runs / names[0]); break
    time.sleep(2)
EOF
kill -KILL -- "-$WORKER_PG"
echo "worker node killed at $(date +%T)"
sleep 5
start_worker
wait_nodes 2
if wait "$SUBMIT"; then echo "le survived the node loss (Train restarted its workers from the last checkpoint)"
else
    echo "le's job failed; the same command again:"
    submit --stage le --num-workers 2 --set train.max_steps=120 --set train.eval_every=20 >"$WORK/le-2.log" 2>&1
fi
grep -hE "restor|resum|Restor|succeeded|output checkpoint" "$WORK"/le-*.log | tail -6

step "6. fetch the checkpoint and evaluate (no Ray)"
python -c "from ccr_ray.storage import Location; Location.of('$STORE/runs/rehearsal/le/checkpoint').download_to('$WORK/le-checkpoint')"
python -c "from ccr_ray.storage import Location; Location.of('$STORE/data/demo').download_to('$WORK/demo-fetched')"
python jobs/evaluate.py "$WORK/le-checkpoint" --data "$WORK/demo-fetched" --split test --langs en,de,fr \
    --out "$WORK/le-test.json"
