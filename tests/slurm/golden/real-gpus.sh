#!/bin/bash
# User values are single-quoted on purpose (they stay literal text), and names may look like
# commands: shellcheck's SC2016 and SC2209 do not apply.
# shellcheck disable=SC2016,SC2209
# Rendered by acb-sbatch from examples/slurm/real-gpus.yaml; edit the job.yaml, not this file.
#SBATCH --job-name=fold
#SBATCH --partition=gpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --gres=gpu:1
#SBATCH --mem=64G
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%j.out
set -uo pipefail

# ---- acb-slurm prologue: start one GPU assigner per node, export the workers' environment ----
# Made to be pasted into an existing batch script: eval "$(acb-sbatch prologue ...)".
# - It exports ACB_BIN and puts it first on PATH; srun, squeue and scancel are looked up now, so
#   a later change of PATH does not reach acb_worker or the cleanup at exit.
# - The assigners' srun steps are not jobs of this shell: a bare `wait` or `jobs -p` sees only
#   the script's own background jobs.
# - Traps: EXIT runs the script's own EXIT handler (one set before the eval) first, then stops
#   the assigners. TERM and INT run the script's own handler when it had one (if that handler
#   does not exit, the script goes on and the assigners stop when it exits), else exit 143/130,
#   which runs the EXIT chain. A trap set after the eval replaces the prologue's, as in any bash
#   script: call acb_stop_assigners at the end of a new EXIT handler, or leave it to Slurm, which
#   ends the assigner steps as the job ends (each takes that SIGTERM as a clean stop). The same
#   holds when the script's EXIT handler itself calls `exit`.
# - set -e/-u/-o pipefail/-x, IFS and PS4 of the script are kept; the prologue runs with xtrace
#   off and the default IFS and restores both; its messages (acb: ...) go to stderr.
# - acb_worker NAME [options] -- CMD... runs a worker step (see below); acb_stop_assigners stops
#   the assigners now.
{ acb_xtrace=${-//[!x]/}; set +x; } 2>/dev/null
acb_ifs_set=${IFS+set}
acb_ifs=${IFS-}
IFS=$' \t\n'
acb_shell_pid=$BASHPID
# Tools are called by absolute path: the bin directory of the Python that rendered this script.
export ACB_BIN=/opt/acb/bin
export PATH="$ACB_BIN:$PATH"
if [[ -z "${SLURM_JOB_ID:-}" || -z "${SLURM_JOB_NODELIST:-}" ]]; then
    echo "acb prologue: SLURM_JOB_ID/SLURM_JOB_NODELIST are not set: run this inside a Slurm job (sbatch)" >&2
    exit 1
fi
acb_srun=$(type -P srun) || acb_srun=
acb_squeue=$(type -P squeue) || acb_squeue=
acb_scancel=$(type -P scancel) || acb_scancel=
acb_sleep=$(type -P sleep) || acb_sleep=
if [[ -z $acb_srun || -z $acb_squeue || -z $acb_scancel || -z $acb_sleep ]]; then
    echo "acb prologue: srun, squeue, scancel and sleep must be on PATH ($PATH)" >&2
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
acb_assigner_args=(--policy simple)
# The job's TLS material (a new CA, the job's key and certificate; docs/SECURITY.md): TCP
# between the assigners, and to them, is mutual TLS with it.
export ACB_TLS_DIR="$ACB_RUN_DIR/tls"
if ! "$ACB_BIN/acb-assigner" tls-init "$ACB_TLS_DIR" >/dev/null; then
    echo "acb prologue: cannot make the job's TLS material in $ACB_TLS_DIR" >&2
    exit 1
fi
acb_assigner_args+=(--tls-dir "$ACB_TLS_DIR")
# The GRES of each assigner step, and of each acb_worker step (the same GPUs, so that a GPU
# index means the same device to both); acb_gpus: the GPUs each node's assigner hands out.
acb_assigner_gres=(--gres=gpu:1)
acb_gpus=1
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
# acb_alive PID: PID runs (a zombie counts as ended). Builtins only.
acb_alive() {
    local IFS=$' \t\n' acb_stat
    { read -r acb_stat </proc/"$1"/stat; } 2>/dev/null || return 1
    acb_stat=${acb_stat##*) }
    [[ ${acb_stat%% *} != [ZX] ]]
}
acb_stop_assigners() {
    # Signal the assigners themselves (scancel --signal reaches a step's tasks without
    # cancelling the step): on SIGINT, like SIGTERM, each releases everything, logs `stop` and
    # exits 0, and slurmstepd does not report the step as cancelled. (srun answers a SIGTERM of
    # its own by killing its tasks.) Whatever still runs after 20 s gets SIGTERM via srun.
    # The srun steps are not jobs of this shell (see the header): they are watched by pid.
    { local acb_x=${-//[!x]/}; set +x; } 2>/dev/null
    local IFS=$' \t\n' acb_step acb_step_name acb_pid acb_tick=0 acb_left
    if ((${#ACB_ASSIGNER_PIDS[@]} == 0)) || [[ $BASHPID != "$acb_shell_pid" ]]; then
        if [[ -n $acb_x ]]; then set -x; fi
        return 0
    fi
    # squeue -j of an array's first job id lists every task's steps (<array id>_<task>.<step>):
    # only this job's own are signalled, never another task's assigners.
    local acb_own=$SLURM_JOB_ID
    if [[ -n ${SLURM_ARRAY_JOB_ID:-} && -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
        acb_own=${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID
    fi
    while read -r acb_step acb_step_name; do
        if [[ $acb_step_name == acb-assigner && ($acb_step == "$acb_own".* || $acb_step == "$SLURM_JOB_ID".*) ]]; then
            "$acb_scancel" --signal=INT "$acb_step" 2>/dev/null || true
        fi
    done < <("$acb_squeue" -h -s -j "$SLURM_JOB_ID" -o '%i %j' 2>/dev/null || true)
    while :; do
        acb_left=()
        for acb_pid in "${ACB_ASSIGNER_PIDS[@]}"; do
            if acb_alive "$acb_pid"; then acb_left+=("$acb_pid"); fi
        done
        if ((${#acb_left[@]} == 0 || acb_tick >= 300)); then
            break
        fi
        if ((acb_tick == 200)); then
            kill -TERM "${acb_left[@]}" 2>/dev/null || true
        fi
        acb_tick=$((acb_tick + 1))
        "$acb_sleep" 0.1 || true
    done
    ACB_ASSIGNER_PIDS=()
    echo "acb: assigners stopped; event logs in $ACB_RUN_DIR/<node>/events.jsonl" >&2
    if [[ -n $acb_x ]]; then set -x; fi
}
# ---- traps: the script's own handlers first, then the prologue's ----
# acb_trap_of SIG: the handler this shell has on SIG (empty when none), into acb_trap.
acb_trap_of() {
    local IFS=$' \t\n'
    local -a acb_words=()
    eval "acb_words=($(trap -p "$1"))"  # trap -- 'HANDLER' SIG
    acb_trap=${acb_words[2]:-}
    acb_trap_set=${acb_words[0]:+set}
}
acb_return() { return "$1"; }
# acb_run_trap STATUS HANDLER ARGS...: eval HANDLER with $? = STATUS and "$@" = ARGS, as bash
# itself would have run it.
acb_run_trap() {
    local acb_handler=$2 acb_status=$1
    shift 2
    if ((acb_status == 0)); then
        eval "$acb_handler"
    else
        acb_return "$acb_status" || eval "$acb_handler"
    fi
}
acb_on_exit() {
    local acb_status=$?
    { local acb_x=${-//[!x]/}; set +x; } 2>/dev/null
    if [[ -n $acb_user_exit ]]; then
        if [[ -n $acb_x ]]; then set -x; fi
        acb_run_trap "$acb_status" "$acb_user_exit" "$@"
        { set +x; } 2>/dev/null
    fi
    trap : TERM INT  # a second signal does not cut the stop short
    acb_stop_assigners
    if [[ -n $acb_x ]]; then set -x; fi
    return "$acb_status"
}
acb_on_signal() {
    local acb_status=$? acb_sig=$1 acb_code=$2 acb_handler
    shift 2
    if [[ $acb_sig == TERM ]]; then acb_handler=$acb_user_term; else acb_handler=$acb_user_int; fi
    if [[ -n $acb_handler ]]; then
        acb_run_trap "$acb_status" "$acb_handler" "$@"
        return 0
    fi
    exit "$acb_code"
}
acb_trap_of EXIT
acb_user_exit=$acb_trap
acb_trap_of TERM
acb_user_term=$acb_trap
# A signal the script ignores (trap '' SIG) stays ignored, by the script and its children.
if [[ -n $acb_trap_set && -z $acb_trap ]]; then acb_term_ignored=1; else acb_term_ignored=; fi
acb_trap_of INT
acb_user_int=$acb_trap
if [[ -n $acb_trap_set && -z $acb_trap ]]; then acb_int_ignored=1; else acb_int_ignored=; fi
# "$@" in a trap is what the script's own handler would have seen there.
trap 'acb_on_exit "$@"' EXIT
if [[ -z $acb_term_ignored ]]; then trap 'acb_on_signal TERM 143 "$@"' TERM; fi
if [[ -z $acb_int_ignored ]]; then trap 'acb_on_signal INT 130 "$@"' INT; fi
# ---- the assigners ----
# The first node's assigner is the controller; the others join it as executors.
# Assigner steps need one CPU: it is given explicitly, since srun of Slurm 22.05-23.02 does not
# inherit the batch script's --cpus-per-task. Each srun is disowned: not a job of this shell.
"$acb_srun" --overlap --export=ALL --nodes=1 --ntasks=1 --cpus-per-task=1 --nodelist="${ACB_NODES[0]}" --job-name=acb-assigner \
    "${acb_assigner_gres[@]}" "$BASH" -c "$acb_assigner_task" acb-assigner \
    "$ACB_BIN/acb-assigner" "${acb_assigner_args[@]}" >/dev/null &
ACB_ASSIGNER_PIDS+=("$!")
disown "$!"
if ! ACB_CONTROLLER=$("$ACB_BIN/acb-sbatch" await-assigners --run-dir "$ACB_RUN_DIR" \
    --timeout 60 --watch-pid "${ACB_ASSIGNER_PIDS[0]}" \
    -- "${ACB_NODES[0]}"); then
    echo "acb prologue: the controller assigner on ${ACB_NODES[0]} did not start; see $ACB_RUN_DIR/${ACB_NODES[0]}/assigner.log" >&2
    exit 1
fi
# Gang members (acb-run --gang: one program over several nodes, e.g. torchrun) join there.
export ACB_CONTROLLER
if ((${#ACB_NODES[@]} > 1)); then
    "$acb_srun" --overlap --export=ALL --nodes=$((${#ACB_NODES[@]} - 1)) --ntasks=$((${#ACB_NODES[@]} - 1)) \
        --ntasks-per-node=1 --cpus-per-task=1 \
        --nodelist="$(IFS=,; echo "${ACB_NODES[*]:1}")" --job-name=acb-assigner \
        "${acb_assigner_gres[@]}" "$BASH" -c "$acb_assigner_task" acb-assigner \
        "$ACB_BIN/acb-assigner" "${acb_assigner_args[@]}" --controller "$ACB_CONTROLLER" >/dev/null &
    ACB_ASSIGNER_PIDS+=("$!")
    disown "$!"
fi
if ! "$ACB_BIN/acb-sbatch" await-assigners --run-dir "$ACB_RUN_DIR" \
    --timeout 60 --watch-pid "${ACB_ASSIGNER_PIDS[-1]}" \
    --write-config "$ACB_ASSIGNERS_CONFIG" --policy simple \
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
# ---- acb_worker: a worker's srun step under acb-run, or one acb-launch step for a group ----
# acb_worker NAME [--gate|--auto|--client] [--node NODE | --per-node N | --per-gpu N]
#            [--srun OPTION]... [acb-run options: --gpus N --memory SIZE ...] -- CMD [ARG]...
# runs CMD as worker NAME (ACB_WORKER) in an srun step on one node (--node, else Slurm's
# choice), under `acb-run --gate` (the default) or `--auto`, or with `--client` as is (CMD talks
# to the assigner itself); the step overlaps the assigner's and asks for the job's
# --cpus-per-task and the assigner's GRES. --per-node N runs N workers on every node of the
# job, --per-gpu N runs N for each GPU of every node's assigner, named NAME-<node>-<i>, in ONE
# step over the nodes (acb-launch starts each node's workers, forwards signals to them), and
# reports each one that fails. acb_worker returns when its worker(s) end, with their exit status
# (1 when one of several failed): put `&` after it to run it in the background, then `wait`.
acb_worker() {
    { local acb_x=${-//[!x]/}; set +x; } 2>/dev/null
    local IFS=$' \t\n' acb_name acb_mode=gate acb_node='' acb_per='' acb_per_gpu='' acb_rc=0
    local acb_n acb_i acb_k acb_count acb_usage acb_group='' acb_dir=''
    local -a acb_run=() acb_srun_opts=() acb_pids=() acb_failed=() acb_codes=()
    acb_usage="usage: acb_worker NAME [--gate|--auto|--client] [--node NODE|--per-node N|--per-gpu N] [--srun OPTION]... [acb-run options] -- CMD [ARG]..."
    if (($# == 0)) || [[ -z $1 || $1 == -* ]]; then
        echo "acb_worker: the first argument is the worker's name; $acb_usage" >&2
        if [[ -n $acb_x ]]; then set -x; fi
        return 2
    fi
    acb_name=$1
    shift
    while (($#)); do
        case $1 in
            --) shift; break ;;
            --gate | --auto | --client) acb_mode=${1#--}; shift ;;
            --node | --per-node | --per-gpu | --srun)
                if (($# < 2)); then
                    echo "acb_worker: $1 needs a value; $acb_usage" >&2
                    if [[ -n $acb_x ]]; then set -x; fi
                    return 2
                fi
                case $1 in
                    --node) acb_node=$2 ;;
                    --per-node) acb_per=$2 ;;
                    --per-gpu) acb_per_gpu=$2 ;;
                    --srun) acb_srun_opts+=("$2") ;;
                esac
                shift 2 ;;
            --node=* | --per-node=* | --per-gpu=* | --srun=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
            *) acb_run+=("$1"); shift ;;
        esac
    done
    if (($# == 0)); then
        echo "acb_worker: no command after --; $acb_usage" >&2
        if [[ -n $acb_x ]]; then set -x; fi
        return 2
    fi
    if [[ $acb_mode == client && ${#acb_run[@]} -gt 0 ]]; then
        echo "acb_worker: ${acb_run[*]}: acb-run options need --gate or --auto, not --client" >&2
        if [[ -n $acb_x ]]; then set -x; fi
        return 2
    fi
    if [[ -n $acb_per || -n $acb_per_gpu ]]; then
        if [[ -n $acb_node || (-n $acb_per && -n $acb_per_gpu) ]]; then
            echo "acb_worker: choose one of --node, --per-node and --per-gpu" >&2
            if [[ -n $acb_x ]]; then set -x; fi
            return 2
        fi
        acb_n=${acb_per:-$acb_per_gpu}
        if [[ ! $acb_n =~ ^[1-9][0-9]*$ ]]; then
            echo "acb_worker: --per-node/--per-gpu want a positive number, not '$acb_n'" >&2
            if [[ -n $acb_x ]]; then set -x; fi
            return 2
        fi
        acb_count=$acb_n
        if [[ -n $acb_per_gpu ]]; then
            if ((acb_gpus == 0)); then
                echo "acb_worker: --per-gpu: this job's assigners have no GPUs; use --per-node" >&2
                if [[ -n $acb_x ]]; then set -x; fi
                return 2
            fi
            acb_count=$((acb_n * acb_gpus))
        fi
        acb_group=1
        # One step over every node, one task per node: acb-launch starts the node's workers
        # (NAME-<node>-<i>), forwards signals to them and writes their exit statuses.
        if ! acb_dir=$(mktemp -d "$ACB_RUN_DIR/launch.XXXXXX"); then
            echo "acb_worker: cannot make a directory for the workers' exit statuses in $ACB_RUN_DIR" >&2
            if [[ -n $acb_x ]]; then set -x; fi
            return 1
        fi
        local -a acb_cmd=("$acb_srun" --overlap --export=ALL --nodes="${#ACB_NODES[@]}"
            --ntasks="${#ACB_NODES[@]}" --ntasks-per-node=1 --kill-on-bad-exit=0 --job-name=acb-launch)
        if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
            acb_cmd+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
        fi
        acb_cmd+=("${acb_assigner_gres[@]}" "${acb_srun_opts[@]}" "$ACB_RUN_DIR/node-env"
            "$ACB_BIN/acb-launch" --name "$acb_name" --count "$acb_count" "--$acb_mode"
            --report "$acb_dir")
        for acb_k in "${acb_run[@]}"; do acb_cmd+=("--run-option=$acb_k"); done
        "${acb_cmd[@]}" -- "$@" &
        acb_pids=("$!")
    else
        local -a acb_cmd=("$acb_srun" --overlap --export=ALL --nodes=1 --ntasks=1)
        if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
            acb_cmd+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
        fi
        if [[ -n $acb_node ]]; then acb_cmd+=(--nodelist="$acb_node"); fi
        acb_cmd+=("${acb_assigner_gres[@]}" "${acb_srun_opts[@]}" "$ACB_RUN_DIR/node-env")
        if [[ $acb_mode != client ]]; then
            acb_cmd+=("$ACB_BIN/acb-run" "--$acb_mode" "${acb_run[@]}" --)
        fi
        if [[ $BASHPID == "$acb_shell_pid" ]]; then
            if [[ -n $acb_x ]]; then set -x; fi
            ACB_WORKER=$acb_name "${acb_cmd[@]}" "$@"
            return
        fi
        ACB_WORKER=$acb_name "${acb_cmd[@]}" "$@" <&0 &
        acb_pids=("$!")
    fi
    # In a subshell (`acb_worker ... &`), a TERM or INT sent to it reaches the worker steps.
    if [[ $BASHPID != "$acb_shell_pid" ]]; then
        trap 'kill -TERM "${acb_pids[@]}" 2>/dev/null' TERM
        trap 'kill -INT "${acb_pids[@]}" 2>/dev/null' INT
    fi
    for acb_k in "${!acb_pids[@]}"; do
        while :; do
            acb_rc=0
            wait "${acb_pids[$acb_k]}" || acb_rc=$?
            # wait returns >128 when a trapped signal came in; the worker may still run.
            if ((acb_rc <= 128)) || ! kill -0 "${acb_pids[$acb_k]}" 2>/dev/null; then break; fi
        done
        if ((acb_rc != 0)) && [[ -z $acb_group ]]; then acb_failed+=("$acb_name=$acb_rc"); fi
    done
    if [[ -n $acb_group ]]; then
        # Each node's exit statuses, one per worker; a node without them (its acb-launch was
        # killed) counts its workers as failed with the step's status.
        if ((acb_rc == 0)); then acb_n=1; else acb_n=$acb_rc; fi
        for acb_node in "${ACB_NODES[@]}"; do
            acb_codes=()
            if [[ -r $acb_dir/$acb_node.codes ]]; then
                mapfile -t acb_codes <"$acb_dir/$acb_node.codes"
            fi
            for ((acb_i = 0; acb_i < acb_count; acb_i++)); do
                acb_k=${acb_codes[$acb_i]:-$acb_n}
                if [[ $acb_k != 0 ]]; then
                    echo "acb: worker $acb_name-$acb_node-$acb_i FAILED with exit code $acb_k" >&2
                    acb_failed+=("$acb_name-$acb_node-$acb_i=$acb_k")
                fi
            done
        done
        rm -rf "$acb_dir"
        acb_rc=0
        if ((${#acb_failed[@]})); then
            echo "acb: ${#acb_failed[@]} of $((acb_count * ${#ACB_NODES[@]})) worker(s) $acb_name-* failed: ${acb_failed[*]}" >&2
            acb_rc=1
        fi
    fi
    if [[ -n $acb_x ]]; then set -x; fi
    return "$acb_rc"
}
echo "acb: ${#ACB_NODES[@]} assigner(s) ready (${ACB_NODES[*]}), controller $ACB_CONTROLLER, run dir $ACB_RUN_DIR" >&2
if [[ -n $acb_ifs_set ]]; then IFS=$acb_ifs; else unset IFS; fi
if [[ -n $acb_xtrace ]]; then set -x; fi
# ---- end of acb-slurm prologue ----

# Workers find acb-run, acb-campaign and the rest where acb-sbatch was installed: the prologue
# put $ACB_BIN first on PATH.

# ---- workers: one acb-launch per node starts all of that node's workers ----
# One srun step over every node, one task per node (Slurm sites rate-limit step creation: one
# step per worker would be nodes x workers steps). Each node's acb-launch reads the plan below,
# starts its node's workers (<group>-<node>-<i>, in ACB_WORKER) under its node's assigner, forwards
# signals to them, restarts nothing, and writes each one's exit status to launch/<node>.codes.
# The step asks for the allocation's cpus_per_task explicitly: srun of Slurm 22.05 to 23.02
# does not inherit sbatch's --cpus-per-task; --overlap lets it share the CPUs with the others;
# --kill-on-bad-exit=0: a node whose worker failed must not end the other nodes' launchers.
# Workers get the same GRES as their node's assigner, so GPU indices mean the same devices.
acb_launch_dir="$ACB_RUN_DIR/launch"
if ! { mkdir -p "$acb_launch_dir" && chmod 0700 "$acb_launch_dir"; }; then
    echo "acb: cannot create $acb_launch_dir" >&2
    exit 1
fi
acb_launch_pid=
printf '%s\n' '{"version":1,"array_task_in_names":true,"groups":[{"name":"fold","count":8,"mode":"gate","run_options":["--gpus","1","--memory","21474836480"],"command":["python","fold.py","--out","results/"],"env":{"OMP_NUM_THREADS":"2"},"workdir":null}]}' >"$acb_launch_dir/workers.json"
srun --overlap --export=ALL --nodes="${#ACB_NODES[@]}" --ntasks="${#ACB_NODES[@]}" \
    --ntasks-per-node=1 --kill-on-bad-exit=0 --cpus-per-task=16 --job-name=acb-launch --gres=gpu:1 \
    "$ACB_RUN_DIR/node-env" "$ACB_BIN/acb-launch" --plan "$acb_launch_dir/workers.json" \
    --report "$acb_launch_dir" &
acb_launch_pid=$!
acb_run_pids=()

# ---- wait for every step, then report each worker (and torchrun run) ----
acb_failed=()
acb_total=0
acb_report() {  # acb_report NAME STATUS
    acb_total=$((acb_total + 1))
    if [[ $2 == 0 ]]; then
        echo "acb: worker $1 finished" >&2
    else
        echo "acb: worker $1 FAILED with exit code $2" >&2
        acb_failed+=("$1=$2")
    fi
}
acb_launch_rc=0
if [[ -n $acb_launch_pid ]]; then
    wait "$acb_launch_pid" || acb_launch_rc=$?
fi
for acb_k in "${!acb_run_pids[@]}"; do
    wait "${acb_run_pids[$acb_k]}" || true
done
# A node whose acb-launch wrote no report (killed, node lost): its workers count as failed with
# the step's exit status.
acb_lost=$acb_launch_rc
if ((acb_lost == 0)); then acb_lost=1; fi
declare -A acb_codes=()
for acb_node in "${ACB_NODES[@]}"; do
    acb_k=0
    if [[ -r $acb_launch_dir/$acb_node.codes ]]; then
        while read -r acb_rc; do
            acb_codes[$acb_node/$acb_k]=$acb_rc
            acb_k=$((acb_k + 1))
        done <"$acb_launch_dir/$acb_node.codes"
    else
        echo "acb: acb-launch on $acb_node reported no exit status (its step exited $acb_launch_rc); its workers count as failed" >&2
    fi
done
acb_group=fold
for acb_node in "${ACB_NODES[@]}"; do
    for ((acb_i = 0; acb_i < 8; acb_i++)); do
        # The array task is part of the name: tasks of one array share results and logs.
        acb_report "$acb_group-${SLURM_ARRAY_TASK_ID:+a$SLURM_ARRAY_TASK_ID-}$acb_node-$acb_i" \
            "${acb_codes[$acb_node/$((acb_i + 0))]:-$acb_lost}"
    done
done
if ((${#acb_failed[@]})); then
    echo "acb: ${#acb_failed[@]} of $acb_total worker(s) failed: ${acb_failed[*]}" >&2
    exit 1
fi
echo "acb: all $acb_total worker(s) finished" >&2
