"""Estimate: one configuration on given GPUs -> per-GPU peak, breakdown and verdict."""
from __future__ import annotations

import os

from pydantic import ValidationError

from vramplan.categories import Category as C
from vramplan.errors import VramplanError, from_validation_error
from vramplan.hardware import (
    GpuSpec,
    detect_gpus,
    detected_used_bytes,
    gpu_notes,
    no_gpu_message,
    parse_gpus,
    with_overrides,
)
from vramplan.memory import Phase, PhaseKind, step_model
from vramplan.model_loader import load_model_spec
from vramplan.model_spec import ModelSpec
from vramplan.results import Estimate, PerGpu
from vramplan.setup import Method, TrainingSetup
from vramplan.stacks import apply_stack, stack_lines
from vramplan.units import GiB, MiB, parse_bytes

# Host memory of one training process before any offload: the Python process with torch,
# CUDA libraries and transformers loaded (RSS). Order of magnitude, not calibrated.
PROCESS_HOST_BYTES = 3 * GiB


def make_setup(**fields) -> TrainingSetup:
    """TrainingSetup from keyword fields, the --stack bundle filling every knob not given
    (vramplan/stacks.py); validation errors become one VramplanError. Every entry point (CLI,
    Python API, plan, strategy comparison) builds its setups here."""
    fields = {k: v for k, v in fields.items() if v is not None}
    try:
        fields, _ = apply_stack(fields)
        return TrainingSetup(**fields)
    except ValidationError as e:
        raise from_validation_error(e) from None


def resolve_gpus(gpus: str | GpuSpec | None, *, gpu_tflops: float | str | None = None,
                 gpu_bandwidth: float | str | None = None, reserve: str | int | None = None) -> GpuSpec:
    """The GPUs to plan for: given (--gpus), else detected; then the user's overrides.

    reserve: memory already in use on each card (--reserve SIZE, or bytes); on detected GPUs
    it defaults to what NVML reports in use before the run (a desktop, another job)."""
    if isinstance(gpus, GpuSpec):
        found = gpus
    elif gpus:
        found = parse_gpus(gpus)
    else:
        detected = detect_gpus()
        if detected is None:
            raise VramplanError(no_gpu_message(), "--gpus")
        found = detected
    source = "--reserve"
    if isinstance(reserve, str):
        reserve = parse_bytes(reserve, "--reserve")
    elif reserve is None and not gpus:
        reserve, source = detected_used_bytes(), "what NVML reports in use before the run"
    return with_overrides(found, tflops=gpu_tflops, bandwidth_gbps=gpu_bandwidth, reserve_bytes=reserve,
                          reserve_source=source)


def with_data_parallel(setup: TrainingSetup, gpus: GpuSpec) -> TrainingSetup:
    """The setup with its data-parallel world: every GPU of --gpus a rank under DeepSpeed, and
    under DDP when no FSDP wraps the model (one process per GPU, the whole model on each)."""
    if setup.sharded or gpus.count == setup.data_parallel:
        return setup
    if setup.deepspeed is None and gpus.count == 1:
        return setup
    try:
        return TrainingSetup(**(setup.model_dump() | {"data_parallel": gpus.count}))
    except ValidationError as e:
        raise from_validation_error(e) from None


def check_compatible(spec: ModelSpec, setup: TrainingSetup, gpus: GpuSpec) -> None:
    if setup.fsdp > gpus.count:
        raise VramplanError(f"--fsdp {setup.fsdp} needs {setup.fsdp} GPUs but --gpus gives {gpus.count}", "--fsdp")
    if gpus.count % setup.nodes:
        raise VramplanError(f"--nodes {setup.nodes} does not divide the {gpus.count} GPUs of --gpus (--gpus counts "
                            "the GPUs of all nodes)", "--nodes")
    if setup.sharded and setup.fsdp > 1 and gpus.count % setup.fsdp:
        raise VramplanError(f"--fsdp {setup.fsdp} does not divide the {gpus.count} GPUs of --gpus", "--fsdp")
    if setup.lora_like:
        smallest = min(min(l.in_features, l.out_features) for layer in spec.layers for l in layer.linears)
        if setup.lora_r > smallest:
            raise VramplanError(f"rank {setup.lora_r} is larger than the smallest adapted layer dimension ({smallest})",
                                "--lora-r")
    if setup.method == Method.GALORE:
        smallest = min(min(l.in_features, l.out_features) for layer in spec.layers for l in layer.linears)
        if setup.galore_rank > smallest:
            raise VramplanError(f"rank {setup.galore_rank} is larger than the smallest projected weight dimension "
                                f"({smallest})", "--galore-rank")


# Architectures whose decoder layer the memory model's rules were held to, phase by phase,
# on the CPU trace of the real step (tests/test_cpu_trace.py) or measured on the H100
# (tests/data/h100_dev.jsonl). Anything else is built and estimated all the same, with a note.
TRACED_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "phi3", "gemma2", "qwen2", "qwen3", "qwen3_moe",
                                "gemma3_text", "granite", "olmo2"})


def coverage_notes(spec: ModelSpec) -> list[str]:
    """What the estimate of this architecture rests on, when it is less than a traced step."""
    notes = []
    untyped = sorted({l.name for layer in spec.layers for l in layer.linears if l.role == "other"})
    if untyped:
        # their outputs and saved inputs follow no rule (DeepSeek's MLA: 21% low on the CPU trace)
        notes.append(f"activations are likely underestimated: no rule for the Linears {', '.join(untyped)} "
                     f"of {spec.model_type} (their weights are counted)")
    if spec.idle_numel:
        notes.append(f"built as {spec.architecture} (an image-text checkpoint): its vision tower and projector, "
                     f"{spec.idle_numel / 1e9:.2f}B parameters, are stored; a text-only step does not run them, so "
                     "they get no gradient and no optimizer state, even in a full fine-tune")
    if spec.dropouts:
        # each dropout keeps a mask (and often its output) for backward; no rule counts them
        said = ", ".join(f"{k}={v:g}" for k, v in spec.dropouts.items())
        notes.append(f"activations are underestimated: the config trains with dropout ({said}), which no rule "
                     "counts (set it to 0 in config.json to estimate the model without it)")
    if spec.model_type not in TRACED_MODEL_TYPES:
        notes.append(f"{spec.model_type}: this architecture's layers were never checked against a traced step "
                     f"(checked: {', '.join(sorted(TRACED_MODEL_TYPES))}); `vramplan verify MODEL --device cpu "
                     "--num-layers 2 --seq-len 512` traces it on this machine, `vramplan verify` on a GPU measures it")
    return notes


def _loss_note(spec: ModelSpec, peak: Phase) -> list[str]:
    """When the loss on the full logits is most of the peak, say so: it is the one large
    term a different loss implementation removes (the reference step uses the model's own)."""
    loss = peak.parts.get(C.TRANSIENT, 0) if peak.kind == PhaseKind.LOSS_BACKWARD else 0
    if loss < 0.25 * peak.allocated or loss < GiB:
        return []
    return [f"the loss backward on {spec.vocab:,}-entry logits holds {loss / GiB:.2f} GiB of this peak (the model's "
            "own cross-entropy: fp32 logits, log-softmax and their grads); a chunked or fused linear cross-entropy "
            "(Liger, torchtune) holds a fraction of that, which this estimate does not model"]


def allocator_overhead(peak_alloc: int) -> int:
    """reserved - allocated at the peak, on a GPU that is nearly full.

    On a roomy GPU the caching allocator keeps every freed block, and the measured
    reserved - allocated ranged from 2% to 85% of the peak (tests/data/h100_dev.jsonl;
    the large values are blocks cached while the model was built or quantized). Under
    pressure the allocator frees its unused cached blocks and retries before raising
    out-of-memory, so what a tight GPU needs is the memory stranded in partly used
    segments. We take the lower envelope of the measured cases whose peak is in the step
    rather than in the build (1.9-6%): 5% of the peak plus 32 MiB."""
    return int(0.05 * peak_alloc) + 32 * MiB


def local_host_ram() -> int | None:
    """Total RAM of this machine (Linux/macOS), used when --host-ram is not given."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# Host RAM assumed for hardware named with --gpus (not this machine's): a workstation or
# server that holds 2-4 such cards. An assumption, not a measurement; --host-ram overrides it.
DEFAULT_HOST_RAM = 128 * GiB


def default_host_ram(gpus_named: bool) -> int | None:
    """Host RAM per node when --host-ram is not given: DEFAULT_HOST_RAM when planning for
    hardware named with --gpus, else this machine's (None when it cannot be read)."""
    return DEFAULT_HOST_RAM if gpus_named else local_host_ram()


def ranks_per_node(setup: TrainingSetup, gpus: GpuSpec) -> int:
    """Training processes on one node, each with its own host memory and offload buffers:
    the data-parallel world (DDP, DeepSpeed) or the FSDP world, spread over --nodes."""
    world = setup.data_parallel if not setup.sharded else setup.fsdp
    return max(min(gpus.count, world) // setup.nodes, 1)


def estimate_spec(spec: ModelSpec, setup: TrainingSetup, gpus: GpuSpec, host_ram: int | None = None) -> Estimate:
    check_compatible(spec, setup, gpus)
    setup = with_data_parallel(setup, gpus)
    model = step_model(spec, setup)
    peak = model.peak
    alloc = peak.allocated
    overhead = allocator_overhead(alloc)
    context = gpus.profile.cuda_context_bytes + 2 * gpus.profile.cublas_workspace_bytes
    breakdown = {c: peak.parts.get(c, 0) for c in C}
    breakdown[C.ALLOCATOR_OVERHEAD] = overhead
    breakdown[C.CUDA_CONTEXT] = context
    reserved = alloc + overhead
    total = reserved + context
    capacity = gpus.profile.memory_bytes
    host = ranks_per_node(setup, gpus) * (PROCESS_HOST_BYTES + model.host_pinned)
    per_gpu = PerGpu(peak_allocated_bytes=alloc, peak_reserved_bytes=reserved, total_bytes=total,
                     breakdown=breakdown, peak_phase=peak.name,
                     phases={p.name: p.allocated for p in model.phases},
                     phase_measured={p.name: p.measured.value for p in model.phases})
    notes = stack_lines(setup) + gpu_notes(gpus) + coverage_notes(spec) + list(model.notes) + _loss_note(spec, peak)
    if spec.resolved_from:
        notes.insert(0, f"{spec.resolved_from!r} resolved to preset {spec.name!r}")
    return Estimate(model=spec.name, setup=setup, description=setup.describe(),
                    gpu_name=gpus.profile.display_name, gpu_count=gpus.count, gpu_memory_bytes=capacity,
                    per_gpu=per_gpu, host_ram_bytes=host, host_ram_available_bytes=host_ram,
                    fits_gpu=total <= capacity, fits_host=host_ram is None or host <= host_ram,
                    fits=total <= capacity and (host_ram is None or host <= host_ram),
                    headroom_bytes=capacity - total, notes=notes)


def estimate_config(model: str | ModelSpec, gpus: str | GpuSpec | None = None, num_layers: int | None = None,
                    host_ram: int | None = None, **setup_fields) -> Estimate:
    setup = make_setup(**setup_fields)
    gspec = resolve_gpus(gpus)
    spec = model if isinstance(model, ModelSpec) else load_model_spec(model, num_layers=num_layers)
    return estimate_spec(spec, setup, gspec, host_ram)
