#!/usr/bin/env bash
# Fault checks of docs/training.md: a training run killed with kill -9 comes back through the launcher, from its
# last complete checkpoint, and prints the same losses as a run that was never killed.
#
#   MEGATRON_LM=third_party/Megatron-LM GPUS=2 tools/gpu_checks/check_faults.sh OUT_DIR
#
# tnl-385m on Tiny Shakespeare (examples/pretrain_tnl_385m.sh: distributed optimizer, DP=GPUS), seeded and
# deterministic, TRAIN_ITERS iterations (default 50) with a checkpoint every SAVE_INTERVAL (default 20):
#   full     not interrupted;
#   between  every process of the run SIGKILLed once iteration KILL_AT (default 30) is logged, between two
#            checkpoints; then the same command again (log between_restart.log);
#   writing  SIGKILLed while it writes its second checkpoint: as soon as that iteration's directory exists while
#            latest_checkpointed_iteration.txt still names the first; then the same command again.
#   tracker  SIGKILLed like between, then its tracker emptied: what a kill inside Megatron's in-place rewrite of the
#            tracker after the first checkpoint leaves on disk; the same command again (the launcher points the
#            tracker at the newest complete checkpoint, megatron_tnllm/checkpoint_tracker.py).
# Megatron-LM (core_v0.19.0 megatron/training/checkpointing.py, save_checkpoint) writes the tracker file
# latest_checkpointed_iteration.txt only after a barrier that follows every rank's write, and loads the iteration
# the tracker names: a half-written checkpoint directory is never loaded, and the next save of that iteration
# overwrites it ("Overwriting old incomplete / corrupted checkpoint"). The script checks that each restart
# loads the last complete checkpoint and continues from the iteration after it, and compares every loss the
# killed run printed and every loss of the restart with the uninterrupted run (tools/megatron_log.py --compare).
set -uo pipefail
out=${1:?usage: $0 OUT_DIR}
: "${MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM checkout at core_v0.19.0}"
gpus=${GPUS:-2} iters=${TRAIN_ITERS:-50} every=${SAVE_INTERVAL:-20} kill_at=${KILL_AT:-30} port=${MASTER_PORT:-29500}
for var in gpus iters every kill_at port; do  # values, not code: checked before any arithmetic sees them
    [[ ${!var} =~ ^[1-9][0-9]{0,4}$ ]] || { printf '%s: %s=%q: expected a positive integer\n' "${0##*/}" "$var" "${!var}" >&2; exit 2; }
done
(( port <= 65529 )) || { echo "${0##*/}: MASTER_PORT=$port: expected at most 65529 (each run takes the next port)" >&2; exit 2; }
(( every < kill_at && kill_at < 2 * every && 2 * every < iters )) || {
    echo "need SAVE_INTERVAL < KILL_AT < 2 x SAVE_INTERVAL < TRAIN_ITERS (got $every, $kill_at, $iters)" >&2
    exit 2
}
# unbuffered: a killed run has printed every iteration it finished
export PYTHON=${PYTHON:-python3} PYTHONUNBUFFERED=1 LOG_INTERVAL=1 MBS=4 GBS=8 SEQ=2048 LR=3e-4 \
    TRAIN_ITERS=$iters SAVE_INTERVAL=$every
work=${WORK_DIR:-/tmp/tnl_faults}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
mkdir -p "$out"
rm -rf "$work/full" "$work/between" "$work/writing" "$work/tracker"  # every run starts from nothing
mkdir -p "$work"
source "$here/tools/gpu_checks/layout_runs.sh"
ensure_data
args=(-- --seed 1234 --deterministic-mode)
# port: each run its own rendezvous port: a killed run's may not be free again yet
failed=0
fail() { echo "FAIL: $*"; failed=1; }
tracker() { cat "$work/$1/latest_checkpointed_iteration.txt" 2>/dev/null || echo none; }
first_iteration() { grep -m1 -oP 'iteration\s+\K\d+(?=/)' "$out/$1.log"; }
# The same losses: 1e-6 and not 0 because a restart's second iteration is recovered from Megatron's averaged
# log line (see tools/megatron_log.py), exact to the 7 printed digits.
same_losses() {
    "$PYTHON" "$here/tools/megatron_log.py" --compare "$out/full.log" "$out/$1.log" --iters "$2" --tol 1e-6 \
        || fail "$1: losses of iterations $2 differ from the uninterrupted run"
}

restart() {  # restart NAME PORT_OFFSET: the same command again; it must load the checkpoint of iteration $every
    local name=$1
    layout_run "${name}_restart" "$gpus" pretrain_tnl_385m.sh CKPT="$name" MASTER_PORT=$((port + $2)) "${args[@]}"
    grep -q "successfully loaded checkpoint from .* at iteration $every\$" "$out/${name}_restart.log" \
        || fail "${name}_restart: did not load the checkpoint of iteration $every"
    [[ $(first_iteration "${name}_restart") == $((every + 1)) ]] \
        || fail "${name}_restart: first logged iteration $(first_iteration "${name}_restart"), not $((every + 1))"
    [[ $(tracker "$name") == "$iters" ]] || fail "${name}_restart: did not finish (tracker $(tracker "$name"))"
    same_losses "${name}_restart" "$((every + 1))-$iters"
}

# kill_after_logging NAME PORT_OFFSET: starts run NAME and kill -9s it once it has logged iteration $kill_at.
kill_after_logging() {
    layout_start "$1" "$gpus" pretrain_tnl_385m.sh MASTER_PORT=$((port + $2)) "${args[@]}"
    until grep -qP "iteration\s+$kill_at/" "$out/$1.log" 2>/dev/null; do
        kill -0 "$layout_pid" 2>/dev/null || { fail "$1: the run ended before iteration $kill_at"; break; }
        sleep 0.2
    done
    kill_run "$layout_pid"
}

# Checkpoints are removed once a scenario is checked: tnl-385m's are ~5.4 GB each (bf16 weights, fp32 Adam state).
layout_run full "$gpus" pretrain_tnl_385m.sh MASTER_PORT=$port "${args[@]}"
rm -rf "$work/full"

kill_after_logging between 1
echo "   killed at iteration $kill_at (tracker: $(tracker between))"
same_losses between "1-$kill_at"
[[ $(tracker between) == "$every" ]] || fail "between: tracker names iteration $(tracker between) after the kill, not $every"
restart between 2
rm -rf "$work/between"

second=$(printf '%s/iter_%07d' "$work/writing" $((2 * every)))
layout_start writing "$gpus" pretrain_tnl_385m.sh MASTER_PORT=$((port + 3)) "${args[@]}"
until [[ -d $second ]]; do
    kill -0 "$layout_pid" 2>/dev/null || { fail "writing: the run ended before writing $second"; break; }
    sleep 0.01
done
during=$(tracker writing)
kill_run "$layout_pid"
echo "   killed while writing $second: tracker $during at the kill, $(tracker writing) after;" \
    "$(find "$second" -type f 2>/dev/null | wc -l) files in the half-written directory"
[[ $during == "$every" ]] \
    || fail "writing: the checkpoint of iteration $((2 * every)) was complete when seen (tracker $during)"
[[ $(tracker writing) == "$every" ]] || fail "writing: tracker names iteration $(tracker writing) after the kill, not $every"
same_losses writing "1-$((2 * every))"
restart writing 4
rm -rf "$work/writing"

kill_after_logging tracker 5
: > "$work/tracker/latest_checkpointed_iteration.txt"
echo "   killed at iteration $kill_at; tracker emptied (checkpoint $every complete on disk)"
restart tracker 6
grep -q "it now names iteration $every, the newest complete checkpoint" "$out/tracker_restart.log" \
    || fail "tracker_restart: the launcher did not name iteration $every in the emptied tracker"
rm -rf "$work/tracker"

(( failed )) && { echo "fault checks FAILED"; exit 1; }
echo "fault checks passed: $gpus GPU(s), all three restarts loaded iteration $every and matched the uninterrupted run"
