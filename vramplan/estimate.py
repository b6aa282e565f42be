"""Estimate: one configuration on given GPUs -> per-GPU peak, breakdown and verdict."""

from __future__ import annotations

import os
from dataclasses import dataclass

from pydantic import ValidationError

from vramplan.allocator import replay
from vramplan.categories import Category as C
from vramplan.errors import VramplanError, from_validation_error
from vramplan.hardware import (
    GpuSpec,
    detect_gpus,
    detected_used_bytes,
    gpu_notes,
    no_gpu_message,
    parse_gpus,
    supports_bf16,
    with_overrides,
)
from vramplan.headroom import SAFE_SHARE, has_safe_headroom
from vramplan.memory import Phase, PhaseKind, step_model
from vramplan.memory.attention import attention_notes
from vramplan.memory.events import step_events
from vramplan.memory.grpo import vllm_colocated_bytes
from vramplan.memory.lora import check_lora_rank, check_lora_targets
from vramplan.memory.optimizers import check_galore_rank
from vramplan.memory.phases import prepare, worst_layer_only
from vramplan.memory.storage import StepModel
from vramplan.model_loader import load_model_spec
from vramplan.model_spec import ModelSpec
from vramplan.reserved import Simulated, alloc_config, expandable_note, simulate
from vramplan.results import Estimate, PerGpu
from vramplan.setup import AdapterDtype, Loss, Precision, TrainingSetup
from vramplan.stacks import apply_stack, stack_lines
from vramplan.units import GiB, MiB, host_ram_bytes, parse_bytes

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


def fp16_on_card(setup: TrainingSetup, gpus: GpuSpec, precision_given: bool) -> tuple[TrainingSetup, list[str]]:
    """A card without bf16 (Turing, Volta: T4, V100, RTX 20xx) trains under fp16 autocast with a
    GradScaler, so when --precision was not given (a stack's bf16/mixed included) the estimate
    uses fp16 there and says why. The GradScaler needs fp32 trainable weights
    (torch==2.13 torch/amp/grad_scaler.py:275), so a full fine-tune drops a bf16 --model-dtype."""
    if precision_given or supports_bf16(gpus.profile) or setup.precision == Precision.FP16:
        return setup, []
    fields = {**setup.model_dump(), "precision": Precision.FP16}
    if not setup.lora_like:
        fields["model_dtype"] = None
    if setup.lora_like and setup.adapter_dtype == AdapterDtype.BF16:
        fields["adapter_dtype"] = AdapterDtype.FP32
    note = (
        f"{gpus.profile.display_name} has no bf16: estimated with --precision fp16 (fp16 autocast and a "
        "GradScaler, fp32 trainable parameters" + ("" if setup.lora_like else ", fp32 weights") + "); "
        "give --precision to override"
    )
    try:
        return TrainingSetup(**fields), [note]
    except ValidationError as e:  # e.g. an optimizer stepped inside backward: fp16's GradScaler cannot
        err = from_validation_error(e)
        raise VramplanError(
            f"{err.message} ({gpus.profile.display_name} has no bf16, so --precision fp16 was assumed; "
            "give --precision to estimate another)",
            err.flag,
        ) from None


def resolve_gpus(
    gpus: str | GpuSpec | None,
    *,
    gpu_tflops: float | str | None = None,
    gpu_bandwidth: float | str | None = None,
    reserve: str | int | None = None,
) -> GpuSpec:
    """The GPUs to plan for: given (--gpus), else detected; then the user's overrides.

    reserve: memory already in use on each card (--reserve SIZE, or bytes); on detected GPUs
    it defaults to what NVML reports in use before the run (a desktop, another job)."""
    if not (gpus is None or isinstance(gpus, (str, GpuSpec))):
        raise VramplanError(
            f"must be a string such as '2x24GB' or 'rtx-4090', or a GpuSpec; got {type(gpus).__name__} "
            f"{str(gpus)[:40]}",
            "--gpus",
        )
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
    return with_overrides(
        found, tflops=gpu_tflops, bandwidth_gbps=gpu_bandwidth, reserve_bytes=reserve, reserve_source=source
    )


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
    check_lora_targets(spec, setup)
    if gpus.count % setup.nodes:
        raise VramplanError(
            f"--nodes {setup.nodes} does not divide the {gpus.count} GPUs of --gpus (--gpus counts "
            "the GPUs of all nodes)",
            "--nodes",
        )
    if setup.sharded and setup.fsdp > 1 and gpus.count % setup.fsdp:
        raise VramplanError(f"--fsdp {setup.fsdp} does not divide the {gpus.count} GPUs of --gpus", "--fsdp")
    check_lora_rank(spec, setup)
    check_galore_rank(spec, setup)


# Architectures whose decoder layer the memory model's rules were held to, phase by phase,
# on the CPU trace of the real step (tests/test_cpu_trace.py) or measured on the H100
# (tests/data/h100_dev.jsonl). Anything else is built and estimated all the same, with a note.
TRACED_MODEL_TYPES = frozenset(
    {"llama", "mistral", "mixtral", "phi3", "gemma2", "qwen2", "qwen3", "qwen3_moe", "gemma3_text", "granite", "olmo2"}
)


def coverage_notes(spec: ModelSpec) -> list[str]:
    """What the estimate of this architecture rests on, when it is less than a traced step."""
    notes = []
    untyped = sorted({l.name for layer in spec.layers for l in layer.linears if l.role == "other"})
    if untyped:
        # their outputs and saved inputs follow no rule (DeepSeek's MLA: 21% low on the CPU trace)
        notes.append(
            f"activations are likely underestimated: no rule for the Linears {', '.join(untyped)} "
            f"of {spec.model_type} (their weights are counted)"
        )
    if spec.idle_numel:
        notes.append(
            f"built as {spec.architecture} (an image-text checkpoint): its vision tower and projector, "
            f"{spec.idle_numel / 1e9:.2f}B parameters, are stored; a text-only step does not run them, so "
            "they get no gradient and no optimizer state, even in a full fine-tune"
        )
    if spec.dropouts:
        # each dropout keeps a mask (and often its output) for backward; no rule counts them
        said = ", ".join(f"{k}={v:g}" for k, v in spec.dropouts.items())
        notes.append(
            f"activations are underestimated: the config trains with dropout ({said}), which no rule "
            "counts (set it to 0 in config.json to estimate the model without it)"
        )
    if spec.defaulted:
        said = ", ".join(f"{k}={v}" for k, v in spec.defaulted.items())
        notes.append(
            f"config.json does not set {', '.join(spec.defaulted)}: transformers' {spec.model_type} defaults "
            f"were used ({said}); they shape memory, so set them if the checkpoint differs"
        )
    if spec.model_type not in TRACED_MODEL_TYPES:
        notes.append(
            f"{spec.model_type}: this architecture's layers were never checked against a traced step "
            f"(checked: {', '.join(sorted(TRACED_MODEL_TYPES))}); `vramplan verify MODEL --device cpu "
            "--num-layers 2 --seq-len 512` traces it on this machine, `vramplan verify` on a GPU measures it"
        )
    return notes


def context_note(spec: ModelSpec, setup: TrainingSetup) -> list[str]:
    """A sequence beyond the config's max_position_embeddings: a warning, not an error (RoPE
    scaling, rope_scaling in config.json, runs a model past its trained context)."""
    if spec.max_positions is None or setup.seq_len <= spec.max_positions:
        return []
    return [
        f"WARNING: --seq-len {setup.seq_len:,} is beyond the model's context (max_position_embeddings "
        f"{spec.max_positions:,}): it runs with RoPE scaling (rope_scaling in config.json), and the model was not "
        "trained that long; the memory is estimated at the length given"
    ]


def fused_expert_note(spec: ModelSpec, setup: TrainingSetup) -> list[str]:
    """MoE experts stored as 3-D tensors under LoRA/QLoRA: neither quantized nor adapted.

    transformers 5.24 models/qwen3_moe/modeling_qwen3_moe.py:211 Qwen3MoeExperts holds
    gate_up_proj and down_proj as nn.Parameter [experts, out, in]; bitsandbytes is applied
    through integrations/bitsandbytes.py:189 replace_with_bnb_linear, which replaces only
    ``type(module) is nn.Linear`` (and Conv1D), and peft's LoRA targets Linear modules. So in
    plain transformers + peft + bitsandbytes the experts stay bf16, frozen, without adapters."""
    experts = [layer.experts for layer in spec.layers if layer.experts]
    if not experts or not setup.lora_like:
        return []
    size = sum(2 * e.numel for e in experts)
    names = ", ".join(sorted({name for e in experts for name, _ in e.tensors}))
    quantized = "neither quantized (bitsandbytes replaces nn.Linear only) nor adapted"
    quant = quantized if setup.quant is not None else "not adapted"
    return [
        f"{spec.model_type}: its MoE experts ({names}) are fused 3-D tensors, not nn.Linear: under transformers "
        f"+ peft{' + bitsandbytes' if setup.quant is not None else ''} they are {quant} (LoRA targets Linears), "
        f"so {size / GiB:.1f} GiB of expert weights stay bf16 and frozen in this estimate; a stack that "
        "quantizes or adapts experts needs its own rule"
    ]


# How each framework turns on a loss that never builds the [N,V] logits, in its own words
# (liger-kernel==0.8.5 README; axolotl==0.19.0 integrations/cut_cross_entropy/README.md;
# trl==1.16.0 sft_trainer.py:1142-1147; torchtune==0.6.1 recipes/configs/*: loss _component_).
FUSED_LOSS_HOWTO = (
    "`--loss liger` (`use_liger_kernel: true` in TRL/HF Trainer; in axolotl the plugin "
    "`axolotl.integrations.liger.LigerPlugin` under `plugins:` with "
    "`liger_fused_linear_cross_entropy: true`), `--loss cce` (in axolotl the plugin "
    "`axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin` under `plugins:`), "
    "`--loss trl-chunked-nll` (TRL 1.16's SFTTrainer does it by default), `--loss unsloth` "
    "(Unsloth's FastLanguageModel, always on), `--loss chunked` (torchtune: "
    "`loss: {_component_: torchtune.modules.loss.CEWithChunkedOutputLoss}`)"
)
# The same, in one line for a strategy row
FUSED_LOSS_SHORT = (
    "the same training with a fused cross-entropy (`--loss liger`): `use_liger_kernel: true` in "
    "TRL/HF Trainer, the CutCrossEntropyPlugin in axolotl, on by default in TRL 1.16 and Unsloth"
)


def _loss_note(spec: ModelSpec, setup: TrainingSetup, peak: Phase) -> list[str]:
    """When the model's own cross-entropy on the full logits is most of the peak, say so and
    how each framework turns on a loss that holds a fraction of it (memory/loss.py)."""
    loss = peak.parts.get(C.TRANSIENT, 0) if peak.kind in (PhaseKind.LOSS_BACKWARD, PhaseKind.FORWARD_LOSS) else 0
    if setup.loss != Loss.HF or loss < 0.25 * peak.allocated or loss < GiB:
        return []
    moment = "backward" if peak.kind == PhaseKind.LOSS_BACKWARD else "forward"
    return [
        f"the loss {moment} on {spec.vocab:,}-entry logits holds {loss / GiB:.2f} GiB of this peak "
        "(the model's own cross-entropy: fp32 logits, log-softmax and their grads); a fused or chunked loss "
        f"holds a fraction of that: {FUSED_LOSS_HOWTO}"
    ]


def _pressure_note(sim: Simulated, total: int, capacity: int) -> list[str]:
    """When the verdict rests on the allocator emptying its cache under pressure."""
    if not sim.fits or total <= capacity:
        return []
    return [
        f"fits only under memory pressure: on a larger card this step would reserve {total / GiB:.2f} GiB with "
        f"the CUDA context; on this one the caching allocator frees its cached blocks and retries "
        f"({sim.capped.num_alloc_retries if sim.capped else 0} times in the simulated step), which costs time"
    ]


def _tight_note(sim: Simulated, capacity: int) -> list[str]:
    """A fit with less free than the headroom rule keeps (headroom.py): said, with why it may
    not hold on the card."""
    if not sim.fits or has_safe_headroom(sim.headroom, capacity):
        return []
    return [
        f"tight: {sim.headroom / GiB:.2f} GiB ({sim.headroom / capacity:.1%}) left, under the "
        f"{SAFE_SHARE:.0%} the recommendations keep: the caching allocator's fragmentation varies between runs "
        "(on 7 of the 20 measured H100 steps the reserved memory ran 0.8-4.6 GiB above this replay, "
        "docs/allocator.md) and a longer sample adds activations; `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` "
        "strands the least, and `vramplan verify` on the card measures it"
    ]


def allocator_overhead(peak_alloc: int) -> int:
    """reserved - allocated at the peak, on a GPU that is nearly full: the flat margin the
    estimate used before the allocator replay (vramplan/reserved.py); plan's affine search
    still ranks configurations with it, and re-checks the rows it reports with the replay.

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


def _setup_notes(
    spec: ModelSpec, setup: TrainingSetup, gpus: GpuSpec, model_notes: list[str], peak: Phase
) -> list[str]:
    """The estimate's notes that do not depend on the allocator replay, in print order
    (the preset a name resolved to first)."""
    notes = (
        stack_lines(setup)
        + context_note(spec, setup)
        + gpu_notes(gpus)
        + coverage_notes(spec)
        + fused_expert_note(spec, setup)
        + model_notes
        + _loss_note(spec, setup, peak)
        + check_lora_rank(spec, setup)
        + check_galore_rank(spec, setup)
        + attention_notes(spec, setup)
    )
    if spec.resolved_from:
        notes.insert(0, f"{spec.resolved_from!r} resolved to preset {spec.name!r}")
    return notes


@dataclass(frozen=True)
class Verdict:
    """What plan needs to confirm a configuration: estimate_spec's GPU verdict and host RAM."""

    fits_gpu: bool
    host_ram_bytes: int
    setup: TrainingSetup


def context_bytes(gpus: GpuSpec) -> int:
    """Outside torch's allocator on every GPU: the CUDA context and two cuBLAS workspaces."""
    return gpus.profile.cuda_context_bytes + 2 * gpus.profile.cublas_workspace_bytes


def _host_bytes(setup: TrainingSetup, gpus: GpuSpec, model: StepModel) -> int:
    """Host RAM of the ranks on one node: each process and its pinned bytes."""
    return ranks_per_node(setup, gpus) * (PROCESS_HOST_BYTES + model.host_pinned)


def gpu_verdict(spec: ModelSpec, setup: TrainingSetup, gpus: GpuSpec, alloc_conf: str | None = None) -> Verdict:
    """estimate_spec's fits_gpu and host_ram_bytes, without what only the report needs (the
    notes, the expandable-segments replay of a step that does not fit): the same step model
    and the same allocator replay against the same capacity."""
    check_compatible(spec, setup, gpus)
    setup = with_data_parallel(setup, gpus)
    # the paged states and the pinned host bytes are the same in every phase of either model,
    # and the every-layer model is the one the events are built from
    prepared = prepare(spec, setup)  # one for the model and the events
    model = step_model(spec, setup, every_layer=True, prepared=prepared)
    paged = model.peak.parts.get(C.PAGED_OPTIMIZER_STATES, 0)
    paged += vllm_colocated_bytes(setup, gpus.profile.memory_bytes)  # outside the step, as the paged states
    capacity = gpus.profile.memory_bytes - context_bytes(gpus) - paged
    # one replay against the capacity: where the roomy replay stays under it the capped one takes
    # the same path, and where it does not, the capped one is simulate's verdict (reserved.py)
    capped = replay(step_events(spec, setup, model, prepared).events, alloc_config(alloc_conf), capacity=capacity)
    return Verdict(capped.oom is None, _host_bytes(setup, gpus, model), setup)


def estimate_spec(
    spec: ModelSpec, setup: TrainingSetup, gpus: GpuSpec, host_ram: int | None = None, alloc_conf: str | None = None
) -> Estimate:
    """alloc_conf: PYTORCH_CUDA_ALLOC_CONF for the allocator replay (default: the environment's)."""
    check_compatible(spec, setup, gpus)
    setup = with_data_parallel(setup, gpus)
    prepared = prepare(spec, setup)  # one for both models
    every_layer = step_model(spec, setup, every_layer=True, prepared=prepared)  # the events' moments
    model = worst_layer_only(every_layer)
    peak = model.peak
    alloc = peak.allocated
    context = context_bytes(gpus)
    capacity = gpus.profile.memory_bytes
    # bitsandbytes paged states: on the GPU (NVML) but outside torch's allocator (categories.py)
    paged = peak.parts.get(C.PAGED_OPTIMIZER_STATES, 0)
    vllm = vllm_colocated_bytes(setup, capacity)  # GRPO's colocated vLLM: its share, beside the step
    paged += vllm
    # reserved and the verdict: the step's events replayed through the caching-allocator model
    config = alloc_config(alloc_conf)
    sim = simulate(spec, setup, capacity - context - paged, config, step_events(spec, setup, every_layer, prepared))
    reserved = max(sim.peak_reserved, alloc)
    breakdown = {c: peak.parts.get(c, 0) for c in C}
    breakdown[C.ALLOCATOR_OVERHEAD] = reserved - alloc
    breakdown[C.CUDA_CONTEXT] = context
    breakdown[C.VLLM_COLOCATED] = vllm
    total = reserved + context + paged
    host = _host_bytes(setup, gpus, model)
    per_gpu = PerGpu(
        peak_allocated_bytes=alloc,
        peak_reserved_bytes=reserved,
        total_bytes=total,
        breakdown=breakdown,
        peak_phase=peak.name,
        phases={p.name: p.allocated for p in model.phases},
        phase_measured={p.name: p.measured.value for p in model.phases},
    )
    notes = _setup_notes(spec, setup, gpus, list(model.notes), peak)
    return Estimate(
        model=spec.name,
        setup=setup,
        description=setup.describe(),
        gpu_name=gpus.profile.display_name,
        gpu_count=gpus.count,
        gpu_memory_bytes=capacity,
        per_gpu=per_gpu,
        host_ram_bytes=host,
        host_ram_available_bytes=host_ram,
        fits_gpu=sim.fits,
        fits_host=host_ram is None or host <= host_ram,
        fits=sim.fits and (host_ram is None or host <= host_ram),
        headroom_bytes=sim.headroom,
        notes=notes
        + _pressure_note(sim, total, capacity)
        + _tight_note(sim, capacity)
        + expandable_note(spec, setup, capacity - context - paged, config, sim),
    )


def estimate_config(
    model: str | ModelSpec,
    gpus: str | GpuSpec | None = None,
    num_layers: int | None = None,
    host_ram: int | None = None,
    **setup_fields,
) -> Estimate:
    setup = make_setup(**setup_fields)
    gspec = resolve_gpus(gpus)
    host_ram = host_ram_bytes(host_ram, "--host-ram")
    setup, card = fp16_on_card(setup, gspec, setup_fields.get("precision") is not None)
    spec = model if isinstance(model, ModelSpec) else load_model_spec(model, num_layers=num_layers)
    est = estimate_spec(spec, setup, gspec, host_ram)
    return est.model_copy(update={"notes": card + list(est.notes)}) if card else est
