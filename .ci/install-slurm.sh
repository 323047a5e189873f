#!/usr/bin/env bash
# Install a local Slurm (slurmctld + slurmd + client) and munge for the real-scheduler tests.
# Idempotent: does nothing when the binaries are already present. Needs root (Debian/Ubuntu).
# Maintainer scripts must not start the daemons: tests/slurm_cluster.py starts its own,
# listening on loopback only, and stops them afterwards.
set -euo pipefail

need=(slurmctld slurmd sbatch srun scontrol squeue sinfo scancel munged)
missing=0
for b in "${need[@]}"; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing=1
done
if [ "$missing" = 0 ]; then
    echo "install-slurm: already installed ($(dpkg-query -W -f='${Version}' slurmctld 2>/dev/null || echo present))"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    echo "install-slurm: must run as root" >&2
    exit 1
fi

# Forbid service starts during installation (invoke-rc.d honours policy-rc.d exit 101).
policy=/usr/sbin/policy-rc.d
had_policy=0
if [ -e "$policy" ]; then
    had_policy=1
    cp -p "$policy" "$policy.shardtrain-bak"
fi
restore_policy() {
    if [ "$had_policy" = 1 ]; then
        mv -f "$policy.shardtrain-bak" "$policy"
    else
        rm -f "$policy"
    fi
}
trap restore_policy EXIT
printf '#!/bin/sh\nexit 101\n' > "$policy"
chmod 0755 "$policy"

export DEBIAN_FRONTEND=noninteractive
for attempt in 1 2 3; do
    if apt-get update -q && apt-get install -y -q --no-install-recommends \
            slurmctld slurmd slurm-client munge; then
        break
    fi
    if [ "$attempt" = 3 ]; then
        echo "install-slurm: apt-get failed" >&2
        exit 1
    fi
    sleep 5
done

# Report daemons a maintainer script may have started anyway (policy-rc.d should prevent it);
# tests/slurm_cluster.py needs ports 6817-6819 free.
if pgrep -x slurmctld >/dev/null 2>&1 || pgrep -x slurmd >/dev/null 2>&1; then
    echo "install-slurm: warning: a slurm daemon is running; the test cluster may not start" >&2
fi
dpkg-query -W -f='install-slurm: installed ${Package} ${Version}\n' slurmctld slurmd slurm-client munge
