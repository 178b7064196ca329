#!/bin/bash
# Train on a SLURM cluster, safe against preemption and time limits. Submit from the repository root,
# with the Python environment active (the job inherits it); the log goes to out/slurm-<job name>-<job id>.log.
#
#   sbatch slurm.sh                                        # trains EXP=best
#   EXP=report sbatch slurm.sh --data-dir ~/data --epochs 5   # flags go on to run_train.py
#   GRID=report_grid sbatch --array=0-23 slurm.sh          # one config of the grid per array task
#   FRESH=1 sbatch slurm.sh                                # start again, without --resume (the experiment changed)
#   scancel --signal=USR1 --batch JOBID                    # save, requeue and resume now
#   EXP=best sbatch --nodes=2 --ntasks-per-node=4 --gres=gpu:4 slurm.sh   # one run on 8 GPUs (docs/distributed.md)
#
# Before the time limit SLURM sends USR1 to this shell (B:USR1@120), which passes it on to Python; the
# engine finishes its step, writes last.ckpt and exits with 75; only then is the job requeued, and the
# requeued job resumes from last.ckpt (--resume). A finished run submitted again does nothing.
# SIGTERM (scancel, preemption) also saves last.ckpt, but does not requeue: submit again to resume.
# A job of several tasks runs them under srun (one process per GPU, ranks from SLURM_PROCID): the USR1 sent to srun
# goes on to every task, all stop at the same step, rank 0 saves; the tasks end on their own (--kill-on-bad-exit=0: a
# task's exit 75 must not kill rank 0 as it exits), a failed one makes the others' next collective fail.
# (torchrun would not pass USR1 on to its workers, pytorch/pytorch#154849: send it to them, pkill -USR1 -f run_train.py)
#
#SBATCH --job-name=cifar100
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=2
#SBATCH --mem=16G
#SBATCH --time=04:00:00
#SBATCH --output=out/slurm-%x-%j.log
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue

PREEMPTED=75            # engine.PREEMPTED_EXIT: last.ckpt is saved
export PYTHONUNBUFFERED=1       # the log shows each line as it happens
cd "${SLURM_SUBMIT_DIR:-.}" || exit 1
echo "== $(date '+%F %T') job ${SLURM_JOB_ID:-none} restart ${SLURM_RESTART_COUNT:-0} on $(hostname)"
gpu=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | paste -sd ';' -)
echo "== gpu: ${gpu:-none found by nvidia-smi} (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset})"
rev=$(git rev-parse --short HEAD 2>/dev/null) && { git diff --quiet HEAD 2>/dev/null || rev="$rev + local changes"; }
echo "== git: ${rev:-unknown}"

resume=--resume
if [ "${FRESH:-}" = 1 ] && [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then    # a requeued FRESH=1 job resumes its own run
    resume=""
fi
if [ -n "${GRID:-}" ]; then
    if [ "${FRESH:-}" = 1 ]; then
        echo "error: FRESH=1 starts an EXP job again; a grid resumes each config: give it another --out" >&2
        exit 2
    fi
    cmd=(python run_grid.py --grid "$GRID" --index "${SLURM_ARRAY_TASK_ID:?GRID needs an array job: sbatch --array=0-N}" "$@")
else
    cmd=(python run_train.py --exp "${EXP:-best}" $resume "$@")
fi
if [ "${SLURM_NTASKS:-1}" -gt 1 ]; then     # one task per GPU; srun no longer inherits --cpus-per-task (SLURM 22.05)
    cmd=(srun --kill-on-bad-exit=0 ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} "${cmd[@]}")
fi
echo "== ${cmd[*]}"

got=""      # $pid below: Python, or srun, which passes USR1 on to every task
forward() { got=$1; echo "== got SIG$1: asking Python to save and stop"; kill -USR1 "$pid" 2>/dev/null; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
"${cmd[@]}" &           # in the background: a trap runs only while the shell waits, not during a foreground child
pid=$!
while :; do
    wait "$pid"; rc=$?
    kill -0 "$pid" 2>/dev/null || break     # wait returns early (rc > 128) when a trapped signal arrives
done

if [ "$got" = USR1 ] && [ "$rc" -eq "$PREEMPTED" ]; then     # saved: requeue; a crash is not retried
    job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
    echo "== exit $rc: requeueing ${job:-$SLURM_JOB_ID} to resume from last.ckpt"
    if scontrol requeue "${job:-$SLURM_JOB_ID}"; then     # SLURM ends this run at once
        echo "== requeued"
    else
        echo "== requeue failed: submit the same command again to resume"
    fi
    exit "$PREEMPTED"
fi
echo "== $(date '+%F %T') exit $rc"
exit "$rc"
