# shellcheck shell=bash
# Shared by launch/local.sh, launch/slurm/opd.sbatch and launch/node.sh (sourced, never run).
#
# Environment knobs read here (all optional):
#   OPD_ENV_SETUP   a file sourced before anything else on every node (module load, conda activate, ...)
#   OPD_VENV        virtualenv to activate; default: $OPD_HOME/.venv when it exists and no container image is
#                   used; set it to an empty string to activate none (the environment is already right)
#   OPD_CONTAINER_IMAGE  (Slurm only) a pyxis image: when set, the virtualenv default is off
# Runtime defaults exported to every process (override any of them in the environment at submit time):
#   NCCL_DEBUG=WARN                 NCCL prints problems only (INFO: topology, transports, rings)
#   TORCH_NCCL_AVOID_RECORD_STREAMS=1  frees NCCL buffers deterministically (less fragmentation)
#   GLOO_SOCKET_IFNAME              Megatron's Gloo groups (distributed optimizer, checkpoints) use the same
#                                   interface as NCCL_SOCKET_IFNAME when that is a plain interface name
# Network variables (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_IB_GID_INDEX, ...) are passed through untouched.
# CUDA_DEVICE_MAX_CONNECTIONS=1 (Megatron's TP/SP communication overlap needs kernels issued in order) is
# set by the trainer's worker processes themselves: exported here it would also serialize the kernels of
# the rollout servers.

OPD_HOME=${OPD_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
export OPD_HOME

opd_log() {
    printf '[opd-launch %(%F %T)T] %s\n' -1 "$*" >&2
}

opd_die() {
    opd_log "error: $*"
    exit 1
}

# Put `opd`, `ray` and python on PATH (see the knobs above) and export the runtime defaults.
opd_activate_env() {
    if [[ -n ${OPD_ENV_SETUP:-} ]]; then
        [[ -f $OPD_ENV_SETUP ]] || opd_die "OPD_ENV_SETUP=$OPD_ENV_SETUP is not a file"
        set +u  # module and conda scripts read unset variables
        # shellcheck disable=SC1090
        source "$OPD_ENV_SETUP"
        set -u
    fi
    local venv
    if [[ -n ${OPD_VENV+set} ]]; then
        venv=$OPD_VENV
    elif [[ -z ${OPD_CONTAINER_IMAGE:-} && -d $OPD_HOME/.venv ]]; then
        venv=$OPD_HOME/.venv
    else
        venv=
    fi
    if [[ -n $venv ]]; then
        [[ -f $venv/bin/activate ]] || opd_die "OPD_VENV=$venv has no bin/activate"
        # shellcheck disable=SC1091
        source "$venv/bin/activate"
    fi
    command -v opd >/dev/null || opd_die "opd is not on PATH on $(hostname): set OPD_VENV, OPD_ENV_SETUP or OPD_CONTAINER_IMAGE"

    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
    if [[ -z ${GLOO_SOCKET_IFNAME:-} && ${NCCL_SOCKET_IFNAME:-} =~ ^[A-Za-z0-9._-]+$ ]]; then
        export GLOO_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME
    fi
}

# Ray token authentication for the whole job, whatever ~/.ray/auth_token says: a fresh 256-bit token in the
# environment every process inherits (head, workers, driver, actors). RAY_AUTH_MODE=disabled opts out.
opd_ray_auth() {
    export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
    if [[ $RAY_AUTH_MODE == token && -z ${RAY_AUTH_TOKEN:-} ]]; then
        RAY_AUTH_TOKEN=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
        export RAY_AUTH_TOKEN
    fi
}

# The Ray directory (session files, logs, sockets, ray_current_cluster) of this Slurm job step, attempt JOB-ATTEMPT
# and step STEP (launch/local.sh: of its Ray head, by port), under OPD_RAY_TMPDIR (default: the parent Ray itself
# would use, $RAY_TMPDIR, $TMPDIR or /tmp). Removed when that Ray stops (launch/node.sh; after a kill
# launch/slurm/task_epilog.sh and launch/local.sh). Nothing goes to /tmp/ray, so no later `ray.init()` on the node
# finds this job's cluster there.
opd_ray_dir() {
    local parent=${OPD_RAY_TMPDIR:-${RAY_TMPDIR:-${TMPDIR:-/tmp}}}
    if [[ -n ${SLURM_STEP_ID:-} ]]; then
        echo "$parent/opd-ray-$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}.$SLURM_STEP_ID"
    else
        echo "$parent/opd-ray-local.${OPD_RAY_PORT:?}"
    fi
}

# Succeeds once a TCP connection to $1:$2 is accepted (bash's /dev/tcp, no tools needed).
opd_port_open() {
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}
