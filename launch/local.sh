#!/bin/bash
# On-policy distillation on this machine, without Slurm: the same shape as launch/slurm/opd.sbatch on one node.
#
#   launch/local.sh CONFIG [key=value ...]
#
# Starts a Ray head of its own (its own port and directory, so other Ray clusters on the machine are left alone and
# nothing is left in /tmp/ray), waits for it, runs `opd train CONFIG ...` with RAY_ADDRESS set, and stops Ray and
# removes its directory when training ends.
# Ctrl-C / SIGTERM / SIGUSR1 reach opd train once: it finishes the current step, writes a checkpoint and exits
# with 128+signal; a second Ctrl-C stops it at once. The exit code is opd train's. Ray and opd train run in
# sessions of their own, so the terminal's Ctrl-C reaches them only through this script.
#
# Knobs (environment): OPD_VENV / OPD_ENV_SETUP (launch/common.sh), OPD_GPUS_PER_NODE / OPD_RAY_TMPDIR /
# OPD_RAY_CLIENT_PORT / OPD_RAY_AGENT_PORT / OPD_RAY_DASHBOARD_PORT (launch/node.sh), and:
#   OPD_RAY_PORT          the head's GCS port (default: a free port)
#   OPD_CPUS_PER_NODE     CPUs Ray advertises (default: this machine's, at least 8 as `opd train` alone uses)
#   OPD_RAY_JOIN_TIMEOUT  seconds to wait for the Ray head (default 120)
#   OPD_LOG_DIR           Ray head log and opd train's pid file (default: logs/opd-local-DATE-TIME)
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if (($# < 1)); then
    echo "usage: launch/local.sh CONFIG [key=value ...]" >&2
    exit 2
fi
opd_activate_env

cpus=$(nproc)
export OPD_CPUS_PER_NODE=${OPD_CPUS_PER_NODE:-$((cpus > 8 ? cpus : 8))}
export OPD_RAY_PORT=${OPD_RAY_PORT:-$(python "$OPD_HOME/launch/helpers.py" free-port)}
OPD_RAY_JOIN_TIMEOUT=${OPD_RAY_JOIN_TIMEOUT:-120}
OPD_LOG_DIR=${OPD_LOG_DIR:-logs/opd-local-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OPD_LOG_DIR"
export RAY_ADDRESS=127.0.0.1:$OPD_RAY_PORT
opd_ray_auth

ray_pid=
train_pid=
stop_signal=

# shellcheck disable=SC2329  # called from the traps
on_signal() {  # forward each signal once to opd train (a second one makes it stop at once)
    stop_signal=${stop_signal:-$1}
    opd_log "got SIG$1"
    if [[ -n $train_pid ]]; then
        kill "-$1" "$train_pid" 2>/dev/null || true
    fi
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap 'on_signal USR1' USR1

# shellcheck disable=SC2329  # called from the EXIT trap
teardown() {
    trap '' INT TERM USR1
    local pid
    for pid in $train_pid $ray_pid; do
        kill -TERM "$pid" 2>/dev/null || continue
        # `ray start --block` stops its processes on SIGTERM; after 30 s its session (node.sh, `ray start`) is
        # killed, and Ray's processes follow their parent's death
        for _ in $(seq 60); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        kill -KILL -- "-$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    [[ -n $ray_pid ]] && rm -rf "$(opd_ray_dir)"  # node.sh removes it unless it was killed
    train_pid=
    ray_pid=
}
trap teardown EXIT

opd_log "Ray head at $RAY_ADDRESS, log $OPD_LOG_DIR/ray-head.log"
setsid "$OPD_HOME/launch/node.sh" ray-head 127.0.0.1 "$OPD_RAY_PORT" >"$OPD_LOG_DIR/ray-head.log" 2>&1 &
ray_pid=$!
start=$SECONDS
until opd_port_open 127.0.0.1 "$OPD_RAY_PORT"; do
    kill -0 "$ray_pid" 2>/dev/null || opd_die "the Ray head exited; see $OPD_LOG_DIR/ray-head.log"
    ((SECONDS - start < OPD_RAY_JOIN_TIMEOUT)) || opd_die "no Ray head after $OPD_RAY_JOIN_TIMEOUT s"
    [[ -n $stop_signal ]] && exit 130
    sleep 0.5
done
python "$OPD_HOME/launch/helpers.py" wait-ray --address "$RAY_ADDRESS" --nodes 1 --timeout "$OPD_RAY_JOIN_TIMEOUT"
[[ -n $stop_signal ]] && exit 130

setsid "$OPD_HOME/launch/node.sh" train "$OPD_LOG_DIR/train.pid" "$@" &
train_pid=$!
rc=0
while true; do
    wait "$train_pid" && rc=0 || rc=$?
    # `wait` also returns (with 128+signal) when a trapped signal arrives; opd train may still be running
    kill -0 "$train_pid" 2>/dev/null || break
done
train_pid=
opd_log "opd train exited with code $rc"
exit "$rc"
