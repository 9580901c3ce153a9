#!/bin/bash
# Run by slurmstepd on a node after each task of launch/slurm/opd.sbatch's job steps ends, however it ended
# (srun --task-epilog): removes the step's Ray directory (launch/common.sh opd_ray_dir; steps without Ray have
# none). launch/node.sh removes it itself when Ray stops on SIGTERM; this covers the kills: srun ends a step with
# SIGKILL, and a plain `scancel` gets there after KillWait. Slurm kills a task epilog that runs for more than a
# few seconds: it only deletes.
set -u
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
rm -rf "$(opd_ray_dir)"
