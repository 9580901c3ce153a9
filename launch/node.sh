#!/bin/bash
# What runs on one node of an opd job, started by launch/slurm/opd.sbatch (through srun) or launch/local.sh.
# Every role activates the environment first (launch/common.sh).
#
#   node.sh ray-head IP PORT               the Ray head on this node; blocks until stopped (SIGTERM), then removes
#                                          its Ray directory
#   node.sh ray-worker IP HEAD_ADDRESS     a Ray worker node joining HEAD_ADDRESS (ip:port); the same
#   node.sh wait-ray ADDRESS NODES TIMEOUT_S   returns once NODES Ray nodes are alive (error after TIMEOUT_S)
#   node.sh rollout IP URLS_FILE CONFIG [key=value ...]
#                                          rollout servers on this node's GPUs (launch/helpers.py rollout);
#                                          URLS_FILE appears once they are all healthy; blocks
#   node.sh train PID_FILE CONFIG [key=value ...]
#                                          writes its pid to PID_FILE (stop signals go there), then
#                                          `opd train CONFIG ...` with RAY_ADDRESS from the caller
#
# Knobs (environment):
#   OPD_GPUS_PER_NODE      GPUs Ray advertises on each node (empty: Ray counts them itself)
#   OPD_CPUS_PER_NODE      CPUs Ray advertises on each node (empty: Ray counts them itself)
#   OPD_RAY_TMPDIR         where each Ray node gets its own directory for the job step (launch/common.sh
#                          opd_ray_dir; default $RAY_TMPDIR, $TMPDIR or /tmp); keep the path short, Ray's unix
#                          sockets must fit in 107 characters
#   OPD_RAY_CLIENT_PORT    head: Ray client server port (Ray's default 10001)
#   OPD_RAY_DASHBOARD_PORT head: start Ray's dashboard on this port (empty: no dashboard)
#   OPD_RAY_AGENT_PORT     every node: the dashboard agent's HTTP port (Ray's default 52365)
#   OPD_ROLLOUT_SERVER, OPD_ROLLOUT_TP, OPD_ROLLOUT_MEM_FRACTION, OPD_ROLLOUT_PORT: see launch/helpers.py rollout
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
opd_activate_env

ray_node_args() {  # flags shared by the head and the workers
    local args=(--disable-usage-stats --block)
    [[ -n ${OPD_GPUS_PER_NODE:-} ]] && args+=("--num-gpus=$OPD_GPUS_PER_NODE")
    [[ -n ${OPD_CPUS_PER_NODE:-} ]] && args+=("--num-cpus=$OPD_CPUS_PER_NODE")
    [[ -n ${OPD_RAY_AGENT_PORT:-} ]] && args+=("--dashboard-agent-listen-port=$OPD_RAY_AGENT_PORT")
    printf '%s\n' "${args[@]}"
}

ray_node() {  # ray_node ARGS...: `ray start ARGS` in this step's own Ray directory, removed once Ray has stopped
    local dir pid rc=0
    dir=$(opd_ray_dir)
    mkdir -p "$dir"
    opd_log "Ray directory $dir"
    ray start "$@" "--temp-dir=$dir" &
    pid=$!
    # `ray start --block` stops its processes on SIGTERM; a kill (srun's way of ending a step) leaves the directory
    # to launch/slurm/task_epilog.sh
    trap 'kill -TERM "$pid" 2>/dev/null || true' TERM INT
    while kill -0 "$pid" 2>/dev/null; do
        wait "$pid" && rc=0 || rc=$?  # a trapped signal also ends `wait`; Ray may still be stopping
    done
    rm -rf "$dir"
    return "$rc"
}

role=${1:?usage: node.sh ray-head|ray-worker|wait-ray|rollout|train ARGS}
shift
case $role in
    ray-head)
        ip=$1 port=$2
        mapfile -t args < <(ray_node_args)
        if [[ -n ${OPD_RAY_DASHBOARD_PORT:-} ]]; then
            args+=(--include-dashboard=true --dashboard-host=0.0.0.0 "--dashboard-port=$OPD_RAY_DASHBOARD_PORT")
        else
            args+=(--include-dashboard=false)
        fi
        [[ -n ${OPD_RAY_CLIENT_PORT:-} ]] && args+=("--ray-client-server-port=$OPD_RAY_CLIENT_PORT")
        ray_node --head "--node-ip-address=$ip" "--port=$port" "${args[@]}"
        ;;
    ray-worker)
        ip=$1 head=$2
        mapfile -t args < <(ray_node_args)
        ray_node "--address=$head" "--node-ip-address=$ip" "${args[@]}"
        ;;
    wait-ray)
        exec python "$OPD_HOME/launch/helpers.py" wait-ray --address "$1" --nodes "$2" --timeout "$3"
        ;;
    rollout)
        ip=$1 urls_file=$2
        shift 2
        exec python "$OPD_HOME/launch/helpers.py" rollout --host "$ip" --urls-file "$urls_file" \
            --server "${OPD_ROLLOUT_SERVER:-sglang}" --gpus "${OPD_GPUS_PER_NODE:-0}" --tp "${OPD_ROLLOUT_TP:-1}" \
            --mem-fraction "${OPD_ROLLOUT_MEM_FRACTION:-0.85}" --base-port "${OPD_ROLLOUT_PORT:-30000}" -- "$@"
        ;;
    train)
        echo $$ >"$1"
        shift
        exec opd train "$@"
        ;;
    *)
        opd_die "node.sh: unknown role $role"
        ;;
esac
