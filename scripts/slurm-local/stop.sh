#!/usr/bin/env bash
# scripts/slurm-local/stop.sh [--purge] - stop the SLURM started by start.sh (by pid files only).
#   --purge  also delete job/controller state, logs, the database and the munge key
set -uo pipefail
BASE=${SLURM_LOCAL_BASE:-/tmp/decon-slurm}
export SLURM_CONF=$BASE/etc/slurm.conf

PIDFILES=("$BASE/run/slurmd.pid" "$BASE/run/slurmctld.pid" "$BASE/run/slurmdbd.pid"
          "$BASE/mysql/mysqld.pid" "$BASE/munge/run/munged.pid")
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# cancel jobs first so that no slurmstepd outlives slurmd
if alive "$BASE/run/slurmctld.pid"; then
  if [ -n "$(timeout 5 squeue -h -o %A 2>/dev/null)" ]; then
    timeout 5 scancel --partition=debug 2>/dev/null
    for i in $(seq 100); do [ -z "$(timeout 5 squeue -h -t R,CG -o %A 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi
# SIGTERM everything at once (each daemon needs ~1-2 s to exit), then wait; SIGKILL after 10 s
pids=()
for pf in "${PIDFILES[@]}"; do
  if alive "$pf"; then pid=$(cat "$pf"); kill "$pid"; pids+=("$pid"); echo "[slurm-local] SIGTERM ${pf##*/} ($pid)"; fi
done
for i in $(seq 100); do
  left=(); for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
  [ ${#left[@]} -eq 0 ] && break; sleep 0.1
done
for pid in "${left[@]}"; do echo "[slurm-local] $pid still alive, SIGKILL"; kill -9 "$pid" 2>/dev/null; done
rm -f "${PIDFILES[@]}"

if [ "${1:-}" = "--purge" ]; then
  rm -rf "$BASE/state" "$BASE/log" "$BASE/mysql" "$BASE/munge" "$BASE/run" "$BASE/etc" "$BASE/fakedev" "$BASE/bin" "$BASE/env.sh"
  echo "[slurm-local] purged state under $BASE"
fi
