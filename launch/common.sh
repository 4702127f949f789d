# shellcheck shell=bash
# Sourced by the launch scripts: run a launcher in the background and forward stop signals to the ranks.
#
# SIGTERM / SIGUSR1 / SIGINT / SIGHUP sent to the script go to the training ranks (the `python -m dist_lora` processes
# under the launcher), not to the launcher: each rank finishes its step, the ranks save a checkpoint together,
# and exit 0. Launchers that get the signal themselves kill their workers instead (torchrun after 30 s, the
# deepspeed launcher at once), which is what this avoids: the launcher runs in a session of its own, so that
# Ctrl-C in a terminal (SIGINT to the terminal's foreground process group) reaches the script alone. Before any
# rank has started (a rendezvous that waits), the signal goes to the launcher, which then stops.

# need_config "$@": the scripts take CONFIG.yaml [key=value ...]
need_config() {
  if [[ $# -lt 1 ]]; then
    echo "usage: $(basename "$0") CONFIG.yaml [key=value ...]" >&2
    exit 2
  fi
}

# True when process $1 is a rank: its interpreter's first `-m` module is dist_lora (the launchers run
# `-m torch.distributed.run ... -m dist_lora` or `-m deepspeed.launcher.launch`, and are not ranks).
is_rank() {
  local prev="" arg
  while IFS= read -r -d '' arg; do
    if [[ $prev == "-m" ]]; then
      # (an explicit status: a bare `return` in a trap handler, where this runs, returns the status of the command
      # the trap interrupted, `wait`'s 128+N, and no rank would ever be found)
      [[ $arg == "dist_lora" ]] && return 0 || return 1
    fi
    prev=$arg
  done < "/proc/$1/cmdline" 2>/dev/null
  return 1
}

# The PIDs of every rank below process $1.
dist_lora_ranks() {
  local parent=$1 child
  for child in $(pgrep -P "$parent" 2>/dev/null); do
    if is_rank "$child"; then
      echo "$child"
    fi
    dist_lora_ranks "$child"
  done
}

# forward_signal RECEIVED SENT: the script got RECEIVED; the ranks get SENT (Ctrl-C's SIGINT and a closed terminal's
# SIGHUP go on as SIGTERM, the same stop to a rank: a launcher started in the background, the deepspeed launcher's
# ranks too, ignores SIGINT).
# Before any rank started, the launcher's whole session gets SIGTERM, and stops.
forward_signal() {
  local received=$1 sent=$2 rank ranks
  launcher_pid=${launcher_pid:-${!:-}}  # (a signal between the launcher's start and the assignment of its PID)
  if [[ -z $launcher_pid ]]; then
    echo "[launch] $received received before the launcher started: exiting" >&2
    exit 130
  fi
  ranks=$(dist_lora_ranks "$launcher_pid")
  if [[ -z $ranks ]]; then
    echo "[launch] $received received before any rank started: stopping the launcher" >&2
    kill -s TERM -- "-$launcher_pid" 2>/dev/null || true
    return
  fi
  echo "[launch] $received received: sending $sent to the ranks (they finish the step, save, and exit)" >&2
  for rank in $ranks; do
    kill -s "$sent" "$rank" 2>/dev/null || true
  done
}

# run_forwarding CMD...: run CMD in the background in a session of its own, forward stop signals, return CMD's
# exit status. CMD starts with SIGUSR1 ignored: SLURM's --signal reaches every process of the job step (under
# proctrack/cgroup), and a launcher, which has no handler for it, would die of it (exit 138: no requeue) while its
# ranks save; the ranks set their own handler.
run_forwarding() {
  launcher_pid=""
  trap 'forward_signal TERM TERM' TERM
  trap 'forward_signal USR1 USR1' USR1
  trap 'forward_signal INT TERM' INT
  trap 'forward_signal HUP TERM' HUP # (a terminal closed, an ssh session lost: the launcher has a session of its own)
  (trap '' USR1 && exec setsid "$@") &
  launcher_pid=$!
  local status=0
  while true; do
    wait "$launcher_pid" && status=0 || status=$?
    # wait returns early (status > 128) when a trapped signal arrives; keep waiting while the launcher runs
    if ! kill -0 "$launcher_pid" 2>/dev/null; then
      break
    fi
  done
  return "$status"
}
