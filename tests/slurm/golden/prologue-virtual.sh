# ---- acb-slurm prologue: start one GPU assigner per node, export the workers' environment ----
# It exports ACB_BIN and puts it first on PATH, and sets traps on EXIT (stop the assigners), TERM
# and INT (exit 143/130, which runs the EXIT trap); traps set earlier on these are replaced.
# Tools are called by absolute path: the bin directory of the Python that rendered this script.
export ACB_BIN=/opt/acb/bin
export PATH="$ACB_BIN:$PATH"
if [[ -z "${SLURM_JOB_ID:-}" || -z "${SLURM_JOB_NODELIST:-}" ]]; then
    echo "acb prologue: SLURM_JOB_ID/SLURM_JOB_NODELIST are not set: run this inside a Slurm job (sbatch)" >&2
    exit 1
fi
mapfile -t ACB_NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
if ((${#ACB_NODES[@]} == 0)); then
    echo "acb prologue: scontrol show hostnames gave no nodes for '$SLURM_JOB_NODELIST'" >&2
    exit 1
fi
ACB_RUN_ROOT=acb-runs
if [[ $ACB_RUN_ROOT != /* ]]; then
    ACB_RUN_ROOT="${SLURM_SUBMIT_DIR:-$PWD}/$ACB_RUN_ROOT"
fi
export ACB_JOB_ID="$SLURM_JOB_ID"
# An array task's run dir is <array job id>_<task id>, the name squeue and sacct show.
if [[ -n ${SLURM_ARRAY_JOB_ID:-} && -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
    export ACB_RUN_DIR="$ACB_RUN_ROOT/${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID"
else
    export ACB_RUN_DIR="$ACB_RUN_ROOT/$SLURM_JOB_ID"
fi
export ACB_TOKEN_FILE="$ACB_RUN_DIR/token"
export ACB_ASSIGNERS_CONFIG="$ACB_RUN_DIR/assigners.json"
# Unix socket paths ($ACB_SOCKET_DIR/<node>/assigner.sock) must fit in 107 bytes: sockets live
# in the run dir unless that makes the path too long, then in a private directory under /tmp.
acb_node_len=0
for acb_node in "${ACB_NODES[@]}"; do
    if ((${#acb_node} > acb_node_len)); then acb_node_len=${#acb_node}; fi
done
acb_socket_fits() { (($(printf '%s' "$1" | wc -c) + 1 + acb_node_len + 14 <= 107)); }
if acb_socket_fits "$ACB_RUN_DIR"; then
    ACB_SOCKET_DIR="$ACB_RUN_DIR"
else
    ACB_SOCKET_DIR="/tmp/acb-$EUID-$SLURM_JOB_ID"
    if ! acb_socket_fits "$ACB_SOCKET_DIR"; then
        echo "acb prologue: the socket path $ACB_SOCKET_DIR/<node>/assigner.sock is longer than 107 bytes (node names of ${acb_node_len} characters)" >&2
        exit 1
    fi
fi
export ACB_SOCKET_DIR
# A run dir that already holds a run (Slurm reused the job id, or requeued the job: node dirs
# with event logs, ready files, a token) is moved aside rather than refused, so that a requeued
# job still runs and a new run never appends to an old event log; the submitted script is kept.
if compgen -G "$ACB_RUN_DIR/*/" >/dev/null || [[ -e $ACB_RUN_DIR/token ]]; then
    acb_old="$ACB_RUN_DIR.old-$(date +%Y%m%d-%H%M%S)"
    if ! mv -T "$ACB_RUN_DIR" "$acb_old"; then
        echo "acb prologue: $ACB_RUN_DIR holds an earlier run and cannot be moved aside" >&2
        exit 1
    fi
    echo "acb prologue: $ACB_RUN_DIR held an earlier run (job id reused or job requeued); moved it to $acb_old" >&2
    if mkdir -p "$ACB_RUN_DIR"; then
        cp -p "$acb_old"/job.sh "$acb_old"/job.yaml "$ACB_RUN_DIR"/ 2>/dev/null || true
    fi
fi
if ! { mkdir -p "$ACB_RUN_DIR" && chmod 0700 "$ACB_RUN_DIR"; }; then
    echo "acb prologue: cannot create the run directory $ACB_RUN_DIR" >&2
    exit 1
fi
if ! (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$ACB_TOKEN_FILE"); then
    echo "acb prologue: cannot write the token file $ACB_TOKEN_FILE" >&2
    exit 1
fi
acb_assigner_args=(--policy gpu-sharing --virtual-gpus 2 --gpu-memory 8589934592)
acb_assigner_gres=()
# One srun task per node runs this: it finds its node (SLURMD_NODENAME), that node's address,
# and starts the assigner on a per-node socket (in ACB_SOCKET_DIR) with an ephemeral TCP port;
# its output and event log stay in the run dir.
# shellcheck disable=SC2016
acb_assigner_task='node="${SLURMD_NODENAME:?}"
dir="$ACB_RUN_DIR/$node"
sockets="$ACB_SOCKET_DIR/$node"
if ! { mkdir -p -m 0700 "$ACB_SOCKET_DIR" "$dir" "$sockets" && chmod 0700 "$dir"; }; then
    exit 1
fi
if [[ -L $ACB_SOCKET_DIR || ! -O $ACB_SOCKET_DIR ]]; then
    echo "$ACB_SOCKET_DIR is not a directory of this user: refusing to put sockets there" >&2
    exit 1
fi
addr=$(scontrol show node -o "$node" 2>/dev/null | tr " " "\n" | sed -n "s/^NodeAddr=//p")
addr=${addr:-0.0.0.0}
if [[ $addr == *:* && $addr != \[* ]]; then
    addr="[$addr]"  # an IPv6 address: HOST:PORT needs it in brackets
fi
rm -f "$dir/ready.json"  # a stale one would announce an assigner that is not running
trap : TERM INT  # outlive the signals Slurm sends to the whole step, to clean up below
"$@" --socket "$sockets/assigner.sock" --tcp "$addr:0" \
    --event-log "$dir/events.jsonl" --ready-file "$dir/ready.json" \
    --token-file "$ACB_TOKEN_FILE" >>"$dir/assigner.log" 2>&1
status=$?
if [[ $ACB_SOCKET_DIR != "$ACB_RUN_DIR" ]]; then
    rmdir "$sockets" "$ACB_SOCKET_DIR" 2>/dev/null
fi
exit "$status"'
ACB_ASSIGNER_PIDS=()
acb_stop_assigners() {
    # Signal the assigners themselves (scancel --signal reaches a step's tasks without
    # cancelling the step): on SIGINT, like SIGTERM, each releases everything, logs `stop` and
    # exits 0, and slurmstepd does not report the step as cancelled. (srun answers a SIGTERM of
    # its own by killing its tasks.) Whatever still runs after 20 s gets SIGTERM via srun.
    local step pid killer
    ((${#ACB_ASSIGNER_PIDS[@]})) || return 0
    for step in $(squeue -h -s -j "$SLURM_JOB_ID" -o '%i %j' 2>/dev/null |
        awk '$2 == "acb-assigner" {print $1}'); do
        scancel --signal=INT "$step" 2>/dev/null || true
    done
    (sleep 20 && kill -TERM "${ACB_ASSIGNER_PIDS[@]}" 2>/dev/null) &
    killer=$!
    for pid in "${ACB_ASSIGNER_PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    kill "$killer" 2>/dev/null || true
    wait "$killer" 2>/dev/null || true
    ACB_ASSIGNER_PIDS=()
    echo "acb: assigners stopped; event logs in $ACB_RUN_DIR/<node>/events.jsonl" >&2
}
trap acb_stop_assigners EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
# The first node's assigner is the controller; the others join it as executors.
# Assigner steps need one CPU: it is given explicitly, since srun of Slurm 22.05-23.02 does not
# inherit the batch script's --cpus-per-task.
srun --overlap --export=ALL --nodes=1 --ntasks=1 --cpus-per-task=1 --nodelist="${ACB_NODES[0]}" --job-name=acb-assigner \
    "${acb_assigner_gres[@]}" bash -c "$acb_assigner_task" acb-assigner \
    "$ACB_BIN/acb-assigner" "${acb_assigner_args[@]}" &
ACB_ASSIGNER_PIDS+=("$!")
if ! ACB_CONTROLLER=$("$ACB_BIN/acb-sbatch" await-assigners --run-dir "$ACB_RUN_DIR" \
    --timeout 60 --watch-pid "${ACB_ASSIGNER_PIDS[0]}" \
    -- "${ACB_NODES[0]}"); then
    echo "acb prologue: the controller assigner on ${ACB_NODES[0]} did not start; see $ACB_RUN_DIR/${ACB_NODES[0]}/assigner.log" >&2
    exit 1
fi
if ((${#ACB_NODES[@]} > 1)); then
    srun --overlap --export=ALL --nodes=$((${#ACB_NODES[@]} - 1)) --ntasks=$((${#ACB_NODES[@]} - 1)) \
        --ntasks-per-node=1 --cpus-per-task=1 \
        --nodelist="$(IFS=,; echo "${ACB_NODES[*]:1}")" --job-name=acb-assigner \
        "${acb_assigner_gres[@]}" bash -c "$acb_assigner_task" acb-assigner \
        "$ACB_BIN/acb-assigner" "${acb_assigner_args[@]}" --controller "$ACB_CONTROLLER" &
    ACB_ASSIGNER_PIDS+=("$!")
fi
if ! "$ACB_BIN/acb-sbatch" await-assigners --run-dir "$ACB_RUN_DIR" \
    --timeout 60 --watch-pid "${ACB_ASSIGNER_PIDS[-1]}" \
    --write-config "$ACB_ASSIGNERS_CONFIG" --policy gpu-sharing \
    -- "${ACB_NODES[@]}" >/dev/null; then
    echo "acb prologue: not every node's assigner started; see $ACB_RUN_DIR/<node>/assigner.log" >&2
    exit 1
fi
# Each srun task must talk to its own node's assigner: `"$ACB_RUN_DIR/node-env" CMD` sets
# ACB_ASSIGNER from SLURMD_NODENAME; ACB_ASSIGNER below is the batch node's.
cat >"$ACB_RUN_DIR/node-env" <<'ACB_NODE_ENV'
#!/bin/bash
# Run CMD with ACB_ASSIGNER pointing at this node's assigner (written by the acb-slurm prologue).
ACB_ASSIGNER="unix:$ACB_SOCKET_DIR/${SLURMD_NODENAME:-$(hostname -s)}/assigner.sock"
export ACB_ASSIGNER
exec "$@"
ACB_NODE_ENV
chmod 0700 "$ACB_RUN_DIR/node-env"
export ACB_ASSIGNER="unix:$ACB_SOCKET_DIR/${ACB_NODES[0]}/assigner.sock"
echo "acb: ${#ACB_NODES[@]} assigner(s) ready (${ACB_NODES[*]}), controller $ACB_CONTROLLER, run dir $ACB_RUN_DIR" >&2
# ---- end of acb-slurm prologue ----
