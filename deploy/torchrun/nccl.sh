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
# Fail a stuck IB transfer after 4.096 us * 2^22 (about 17 s) instead of hanging on a dead peer.
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# A collective that errors or times out tears the process down, so torchrun ends the job on every node.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}"
# Dump the flight recorder of the stuck collective on a timeout (the evidence of which rank hung).
export TORCH_NCCL_TRACE_BUFFER_SIZE="${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}"
export TORCH_NCCL_DUMP_ON_TIMEOUT="${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}"
# Megatron's tensor/sequence-parallel overlap relies on one hardware queue per device.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"

for _var in NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME NCCL_IB_HCA NCCL_IB_GID_INDEX; do
    if [[ -z "${!_var}" ]]; then
        unset "$_var"
    fi
done
unset _var
