#!/usr/bin/env bash
# Write a DeepSpeed hostfile for the current SLURM allocation (or a given node list).
#
#   launch/write_hostfile.sh OUTPUT [SLOTS_PER_NODE] [NODELIST]
#
# SLOTS_PER_NODE defaults to what SLURM granted (SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE),
# NODELIST to $SLURM_JOB_NODELIST. A thin wrapper so shell scripts need no Python knowledge;
# the parsing and its error messages live in megatron_stablelm/launch/hostfile.py.
set -euo pipefail
if [[ $# -lt 1 || $# -gt 3 ]]; then
    echo "usage: $0 OUTPUT [SLOTS_PER_NODE] [NODELIST]" >&2
    exit 2
fi
args=(write -o "$1")
if [[ $# -ge 2 && -n "$2" ]]; then args+=(--slots "$2"); fi
if [[ $# -ge 3 && -n "$3" ]]; then args+=(--nodelist "$3"); fi
exec "${PYTHON:-python}" -m megatron_stablelm.launch.hostfile "${args[@]}"
