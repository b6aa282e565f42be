"""The memory categories, shared by the estimate and by ``verify``'s measurements."""

from __future__ import annotations

from enum import Enum


class Category(str, Enum):
    WEIGHTS = "weights"  # parameters the model computes with (frozen or trained)
    QUANT_STATE = "quant_state"  # 4-bit absmax / scales / zeros / codes
    ADAPTERS = "adapters"  # LoRA A and B
    GRADIENTS = "gradients"  # .grad of trainable parameters (sharded under FSDP)
    OPTIMIZER_STATES = "optimizer_states"  # Adam moments, 8-bit states, GaLore projectors
    # bitsandbytes paged optimizers: states of tensors >= 1e5 elements in CUDA unified memory
    # (cudaMallocManaged). Resident on the GPU (nvidia-smi, NVML) but outside torch's allocator
    # statistics, so not in ALLOCATED: it counts toward the per-GPU total, not the peak allocated.
    PAGED_OPTIMIZER_STATES = "paged_optimizer_states"
    ACTIVATIONS = "activations"  # tensors autograd saved for backward
    TRANSIENT = "transient"  # short-lived peaks: loss path, dequant, optimizer temporaries
    FSDP_BUFFERS = "fsdp_buffers"  # unsharded parameters, all-gather and reduce-scatter buffers
    COMM_BUFFERS = "comm_buffers"  # DDP gradient buckets, DeepSpeed reduce buckets and gathered partitions
    ALLOCATOR_OVERHEAD = "allocator_overhead"  # reserved - allocated (caching allocator)
    CUDA_CONTEXT = "cuda_context"  # CUDA context + library workspaces, outside torch's statistics
    # GRPO with vLLM colocated: its gpu_memory_utilization share of the GPU (weights, KV cache),
    # held for the whole run beside the training step (memory/grpo.py)
    VLLM_COLOCATED = "vllm_colocated"

    @property
    def label(self) -> str:
        return self.value.replace("_", " ")


#: Categories that torch.cuda.max_memory_allocated() counts.
ALLOCATED = tuple(
    c
    for c in Category
    if c
    not in (
        Category.ALLOCATOR_OVERHEAD,
        Category.CUDA_CONTEXT,
        Category.PAGED_OPTIMIZER_STATES,
        Category.VLLM_COLOCATED,
    )
)

#: One colour per category, shared by plots and terminal tables.
COLORS = {
    Category.WEIGHTS: "#4C72B0",
    Category.QUANT_STATE: "#64B5CD",
    Category.ADAPTERS: "#8172B2",
    Category.GRADIENTS: "#DD8452",
    Category.OPTIMIZER_STATES: "#C44E52",
    Category.PAGED_OPTIMIZER_STATES: "#E8999B",
    Category.ACTIVATIONS: "#55A868",
    Category.TRANSIENT: "#CCB974",
    Category.FSDP_BUFFERS: "#937860",
    Category.COMM_BUFFERS: "#A6761D",
    Category.ALLOCATOR_OVERHEAD: "#8C8C8C",
    Category.CUDA_CONTEXT: "#2F2F2F",
    Category.VLLM_COLOCATED: "#B07AA1",
}
