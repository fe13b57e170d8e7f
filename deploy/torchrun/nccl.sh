# shellcheck shell=bash
# NCCL and torch.distributed settings for the learner nodes and the engines (sourced by learner.sh and
# engine.sh). Values already in the environment win; empty ones are left unset (NCCL's own choice).

# The network interface for NCCL's bootstrap and socket transport, and for gloo (the learner's batch
# broadcast and the CPU side of checkpoints). Set it on multi-homed nodes, e.g. eth0, bond0, ib0.
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-}"
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$NCCL_SOCKET_IFNAME}"
# InfiniBand / RoCE: the HCAs to use (e.g. mlx5_0,mlx5_1,...); RoCE v2 usually needs GID index 3.
export NCCL_IB_HCA="${NCCL_IB_HCA:-}"
export NCCL_IB_GID_INDEX="${NCCL_IB_GID_INDEX:-}"
# Fail a stuck IB transfer after 4.096 us * 2^22 (about 17 s) instead of hanging on a dead peer (well within the
# weight sync's broadcast deadline, so a dead engine's transfer errors before rank 0 gives up on it).
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Watchdog settings, ordered so that an engine dying mid-broadcast costs one weight-sync attempt, never learner
# rank 0 (learner/weight_sync/group.py, docs/reliability.md): rank 0's deadline on a bucket
# (weight_sync.broadcast_timeout_s: 300 s by default, 600 s in the recipes) fires first and aborts the weight-update
# group, whose own timeout is 60 s later and whose watchdog only aborts it (it is built with
# TORCH_NCCL_ASYNC_ERROR_HANDLING=2, whatever is set here).
# The learner's own groups: a collective that errors or times out tears the process down, so torchrun ends the
# job on every node (engine.sh sets 2 instead: an engine must outlive a weight update the learner aborted).
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}"
# 0: otherwise any group's error (the weight-update group's included) raises a process-wide dump flag on which
# the default group's heartbeat monitor kills the process: rank 0 would die ~10 min after an engine did. The
# flight recorder still records (dump it on demand with TORCH_NCCL_DEBUG_INFO_PIPE_FILE).
export TORCH_NCCL_TRACE_BUFFER_SIZE="${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}"
export TORCH_NCCL_DUMP_ON_TIMEOUT="${TORCH_NCCL_DUMP_ON_TIMEOUT:-0}"
# A watchdog silent this long is taken for hung and the process killed: it must exceed what the watchdog spends on
# an error before it returns (4 x TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC = 60 s, then the communicator's abort).
export TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC="${TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC:-600}"
# Megatron's tensor/sequence-parallel overlap relies on one hardware queue per device.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"

for _var in NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME NCCL_IB_HCA NCCL_IB_GID_INDEX; do
    if [[ -z "${!_var}" ]]; then
        unset "$_var"
    fi
done
unset _var
