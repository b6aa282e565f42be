"""The memory model: per-GPU bytes by category at each phase of one training step.

Every rule lives here once, with where it comes from. "[cal]" marks a rule checked
against tests/data/h100_dev.jsonl (H100, torch 2.11, transformers 5.17, peft 0.21,
bitsandbytes 0.50, galore-torch 1.0, hqq 0.2.8). Notation: N tokens per micro-batch,
h hidden, q = heads*head_dim, kv = kv_heads*head_dim, f MLP width, V vocab, r LoRA rank,
W FSDP world size. All values are integer bytes.

The step is modelled as phases (build, forward, loss backward, layer backward,
optimizer step). Each phase gives a breakdown by Category of what is alive; the peak is
the largest phase. Steady state (step >= 1) is modelled: optimizer states exist from
the first step on, and step 0 is never larger except for GaLore's first SVD, modelled
as its own phase.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vramplan.categories import ALLOCATED, Category as C
from vramplan.model_spec import LayerSpec, Linear, ModelSpec
from vramplan.setup import LoraTargets, Method, Optim, Precision, Quant, TrainingSetup

MiB = 2**20
BLOCK = 512  # caching allocator rounds every allocation up to 512 B

# bitsandbytes 4-bit (functional.quantize_4bit, blocksize 64, compress_statistics=True):
# packed n/2 uint8 + absmax re-quantized to uint8 (n/64) + fp32 absmax per 256 blocks.
NF4_BLOCK, NF4_NESTED_BLOCK = 64, 256
NF4_SMALL_TENSORS = 3  # offset, 16-entry nf4 code, nested 256-entry code: one 512 B block each
# hqq 0.2.x, nbits=4, group_size=64: packed n/2 uint8 + bf16 scale and bf16 zero per group.
HQQ_GROUP = 64
# Quantizing one Linear on the device (verify's build; bytes per weight element beyond what
# the finished 4-bit layer keeps). bitsandbytes quantize_4bit (CUDA kernel): the bf16
# source 2, plus per block of 64 the fp32 absmax and its offset-subtracted copy for the
# nested quantization. hqq Quantizer.quantize (optimize_weights_proximal, fp16 working
# dtype on CUDA): the bf16 source 2 + W.float() 4 + the fp16 copy W_f 2 + eight fp16
# full-size iterates and temporaries at its peak inside shrink_lp_op 16 = 24 (traced on
# hqq's own code run with its CUDA dtype), plus fp32 min, max, scale, zero and fp16
# scale, zero per group of 64.
NF4_QUANTIZE_BYTES, NF4_QUANTIZE_BLOCK_BYTES = 2, 8
HQQ_QUANTIZE_BYTES, HQQ_QUANTIZE_GROUP_BYTES = 24, 4 * 4 + 2 * 2
# bitsandbytes Optimizer2State: tensors with numel >= 4096 get uint8 state1/state2 and
# an fp32 absmax per block of 256; smaller tensors keep fp32 states.
BNB_MIN_8BIT, BNB_BLOCK = 4096, 256
# An RMSNorm's backward (transformers' Llama/Gemma RMSNorm: fp32 pow, mean, rsqrt, mul):
# bytes per token and hidden unit beyond its saved input and the incoming grad. The same
# eager elementwise autograd graph runs on CUDA. [CPU trace: 20.0 with and without a
# trained weight]
RMS_NORM_BACKWARD = 20
# Runtime buffers outside the model per token: input_ids, labels, shifted labels (int64). [cal]
INPUT_BYTES_PER_TOKEN = 24
# cuBLAS workspace, allocated through the caching allocator once per (handle, stream):
# the forward thread and autograd's backward thread each hold one. torch
# CUBLAS_WORKSPACE_CONFIG default ":4096:8" on sm90 = 32 MiB. It is created by the first
# matmul of the process, so the reference protocol's warm baseline excludes it from
# peak_allocated; it is counted with the CUDA context for the fit verdict. [cal: first case +64 MiB]
CUBLAS_WORKSPACE = 2 * 32 * MiB


def _r(n: int | float) -> int:
    """Round one allocation up to the allocator's 512 B granularity."""
    n = int(n)
    return -(-n // BLOCK) * BLOCK


@dataclass
class Phase:
    name: str
    parts: dict = field(default_factory=dict)

    def add(self, cat: C, nbytes: int | float) -> "Phase":
        self.parts[cat] = self.parts.get(cat, 0) + int(nbytes)
        return self

    @property
    def allocated(self) -> int:
        return sum(v for c, v in self.parts.items() if c in ALLOCATED)


# The four phases a measurement reports (verify's probes, the CPU trace); each modelled
# phase happens inside one of them.
MEASURED_PHASES = ("build", "forward", "backward", "optimizer")


def measured_phase(name: str) -> str:
    """The measured phase a modelled phase falls in ("layer 3 backward (mlp)" -> backward)."""
    if name.startswith("build"):
        return "build"
    if name.startswith(("forward", "4-bit dequantize (forward)")):
        return "forward"
    if name.startswith(("optimizer step", "GaLore SVD")) and "in backward" not in name:
        return "optimizer"
    return "backward"  # loss backward, final norm, layer points, layer-wise optimizer hooks


# ------------------------------------------------------------------ parameters

@dataclass(frozen=True)
class Param:
    """One parameter tensor as the run holds it."""
    numel: int
    dim0: int
    kind: str            # dense | nf4 | hqq4 | lora
    trainable: bool
    layer: int | None    # decoder layer index, None for the root (embeddings, final norm, head)
    galore: tuple[int, int] | None = None  # (m, n) for GaLore-projected 2-D weights
    role: str | None = None  # the Linear's role (q, down, ...) for Linear weights, biases and adapters


def _lora_targeted(lin: Linear, setup: TrainingSetup) -> bool:
    if not setup.lora_like or lin.role in ("router", "other"):
        return False
    if setup.lora_targets == LoraTargets.ATTENTION:
        return lin.role in ("q", "k", "v", "qkv", "o")
    return True


def parameters(spec: ModelSpec, setup: TrainingSetup) -> list[Param]:
    """Every parameter tensor with how it is stored and whether it trains."""
    full = setup.method in (Method.FULL, Method.GALORE)
    galore = setup.method == Method.GALORE
    quant = setup.quant.value if setup.method == Method.QLORA else None
    out: list[Param] = []
    for i, layer in enumerate(spec.layers):
        for lin in layer.linears:
            # reference step: GaLore projects 2-D weights inside attention and MLP blocks
            proj = (lin.out_features, lin.in_features) if galore and lin.role not in ("other",) else None
            out.append(Param(lin.numel, lin.out_features, quant or "dense", full, i, proj, lin.role))
            if lin.bias:
                out.append(Param(lin.out_features, lin.out_features, "dense", full, i, role=lin.role))
            if _lora_targeted(lin, setup):
                out.append(Param(setup.lora_r * lin.in_features, setup.lora_r, "lora", True, i, role=lin.role))
                out.append(Param(lin.out_features * setup.lora_r, lin.out_features, "lora", True, i, role=lin.role))
        if layer.experts:
            for _, shape in layer.experts.tensors:
                n = shape[0] * shape[1] * shape[2]
                out.append(Param(n, shape[0], "dense", full, i))
        for n in layer.norm_numels + layer.other_numels:
            out.append(Param(n, n, "dense", full, i))
    out.append(Param(spec.embed_numel, spec.vocab, "dense", full, None))
    if spec.lm_head_numel:
        out.append(Param(spec.lm_head_numel, spec.vocab, "dense", full, None))
    if spec.final_norm_numel:
        out.append(Param(spec.final_norm_numel, spec.final_norm_numel, "dense", full, None))
    if spec.other_numel:
        out.append(Param(spec.other_numel, spec.other_numel, "dense", full, None))
    if spec.idle_numel:  # never in the text step's graph: no .grad, so AdamW makes no state for it
        out.append(Param(spec.idle_numel, spec.idle_numel, "dense", False, None))
    return out


def _dense_bytes(setup: TrainingSetup) -> int:
    return 4 if setup.precision == Precision.MIXED else 2


def _store(p: Param, setup: TrainingSetup, numel: int | None = None) -> dict:
    """Bytes of one parameter (or a shard of `numel` elements of it) by category."""
    n = p.numel if numel is None else numel
    if p.kind == "lora":
        # peft get_peft_model(autocast_adapter_dtype=True) upcasts bf16 adapters to fp32 [cal]
        return {C.ADAPTERS: _r(4 * n)}
    if p.kind == "nf4":
        blocks = -(-n // NF4_BLOCK)
        state = _r(blocks) + _r(4 * -(-blocks // NF4_NESTED_BLOCK)) + NF4_SMALL_TENSORS * BLOCK
        return {C.WEIGHTS: _r(n / 2), C.QUANT_STATE: state}
    if p.kind == "hqq4":
        groups = -(-n // HQQ_GROUP)
        return {C.WEIGHTS: _r(n / 2), C.QUANT_STATE: 2 * _r(2 * groups)}
    return {C.WEIGHTS: _r(_dense_bytes(setup) * n)}


def _compute_bytes(p: Param, setup: TrainingSetup) -> int:
    """Bytes of a parameter as FSDP all-gathers it: param_dtype bf16 (FSDP2 needs one
    compute dtype per unit, so peft's fp32 adapters are gathered in bf16 too); 4-bit stays packed."""
    if p.kind in ("nf4", "hqq4"):
        return -(-p.numel // 2)
    return 2 * p.numel


def _shard(p: Param, world: int) -> int:
    """FSDP2 shards dim 0, padded to ceil(dim0 / W) rows on every rank."""
    if world == 1:
        return p.numel
    rows = -(-p.dim0 // world)
    return rows * (p.numel // p.dim0)


def _grad_bytes(p: Param, setup: TrainingSetup) -> int:
    if not p.trainable:
        return 0
    return 4 if p.kind == "lora" else _dense_bytes(setup)


# ------------------------------------------------------------------ optimizer

def _bnb8_state(n: int) -> int:
    """bitsandbytes 8-bit Adam state1 + state2 for n elements."""
    if n < BNB_MIN_8BIT:
        return 2 * _r(4 * n)
    return 2 * (_r(n) + _r(4 * -(-n // BNB_BLOCK)))


def _galore_rank(p: Param, setup: TrainingSetup) -> int:
    m, n = p.galore
    return min(setup.galore_rank, m, n)


def _optimizer_state(p: Param, setup: TrainingSetup, numel: int) -> int:
    """Persistent optimizer bytes for one parameter (or its shard of `numel`)."""
    if not p.trainable:
        return 0
    optim = setup.optim
    gbytes = _grad_bytes(p, setup)
    if p.galore is not None:
        m, n = p.galore
        r = _galore_rank(p, setup)
        low = r * max(m, n)  # low-rank gradient m x r (m >= n) or r x n
        moments = _bnb8_state(low) if optim.is_8bit else 2 * _r(gbytes * low)
        # galore_projector.get_orthogonal_matrix: bf16 grads -> a fresh r*min(m,n) copy;
        # fp32 grads -> a slice view that keeps the whole U or Vh (min(m,n)^2) alive.
        proj = _r(2 * r * min(m, n)) if gbytes == 2 else _r(4 * min(m, n) ** 2)
        return moments + proj
    if optim.is_8bit:
        return _bnb8_state(numel)
    return 2 * _r(gbytes * numel)  # torch AdamW: exp_avg, exp_avg_sq = zeros_like(p)


def _optimizer_transient(params: list[Param], setup: TrainingSetup, world: int) -> int:
    """Largest temporary during optimizer.step() (steady state)."""
    trainable = [p for p in params if p.trainable]
    if not trainable:
        return 0
    optim = setup.optim
    if optim == Optim.ADAMW_TORCH:
        # torch.optim.AdamW foreach: _foreach_sqrt(exp_avg_sqs) allocates one copy of all
        # states of a device/dtype group at once. [cal: l32-1b full, phi3 full = 5x params]
        return sum(_r(_grad_bytes(p, setup) * _shard(p, world)) for p in trainable)
    if optim in (Optim.ADAMW_TORCH_FUSED, Optim.ADAMW_BNB_8BIT):
        return 0  # fused kernels update in place
    worst = 0
    for p in trainable:
        g = _grad_bytes(p, setup)
        if p.galore is None:
            # galore_torch AdamW plain group: denom = exp_avg_sq.sqrt(); exp_avg / denom
            t = 0 if optim.is_8bit else 2 * _r(g * p.numel)
        else:
            m, n = p.galore
            # project_back (m*n) then * scale (m*n); 8-bit also p.saved_data = p.data.clone()
            t = (3 if optim.is_8bit else 2) * _r(g * m * n)
        worst = max(worst, t)
    return worst


def _svd_transient(params: list[Param], setup: TrainingSetup) -> int:
    """GaLore projector refresh: grad.float() + torch.linalg.svd; [notes: ~5x the fp32 matrix]."""
    worst = 0
    for p in params:
        if p.galore is not None and p.trainable:
            m, n = p.galore
            k = min(m, n)
            worst = max(worst, _r(4 * m * n) + _r(4 * m * k) + _r(4 * k * n) + 2 * _r(4 * m * n))
    return worst


# ------------------------------------------------------------------ activations

@dataclass(frozen=True)
class ActCtx:
    """What decides which tensors autograd saves inside a decoder layer."""
    weights_train: bool   # base Linear weights need grad (full / galore)
    norms_train: bool
    stream: int           # bytes per element of the residual stream (4 under autocast)
    autocast: bool        # fp32 stream fed to autocast Linears (each casts its own copy)
    adapters_bf16: bool   # LoRA computes in bf16: under autocast, or under FSDP2 (param_dtype bf16)
    quant: str | None
    lora_dropout: bool
    lora_r: int
    setup: TrainingSetup


def _act_ctx(setup: TrainingSetup) -> ActCtx:
    full = setup.method in (Method.FULL, Method.GALORE)
    return ActCtx(weights_train=full, norms_train=full, stream=4 if setup.autocast else 2,
                  autocast=setup.autocast, adapters_bf16=setup.autocast or setup.fsdp > 1,
                  quant=setup.quant.value if setup.method == Method.QLORA else None,
                  lora_dropout=setup.lora_dropout > 0, lora_r=setup.lora_r, setup=setup)


def _norm_saved(spec: ModelSpec, ctx: ActCtx, input_grad: bool, width: int | None = None) -> int:
    """Per token, one norm over `width` elements (the hidden size unless given: q/k norms
    read q_dim/kv_dim). HF LlamaRMSNorm: x.to(fp32) saved by pow/mul (4h); the
    normalized x.to(dtype) is saved by `weight *` only when the weight trains. Gemma's
    RMSNorm keeps the fp32 product (4h). LayerNorm saves its input. [cal]"""
    h = width or spec.hidden
    if not input_grad and not ctx.norms_train:
        return 0  # frozen weight and an input without grad: no autograd node
    if spec.norm_kind == "layer":
        return ctx.stream * h
    saved = 4 * h
    if ctx.norms_train:
        saved += 4 * h if (spec.norm_kind == "rms_gemma" or ctx.stream == 4) else 2 * h
    return saved


def _lora_saved(in_dim: int, ctx: ActCtx, input_grad: bool, x_saved: bool = False) -> int:
    """peft LoRA Linear: x.to(fp32) -> dropout (bool mask when the input needs grad) ->
    lora_A saves its fp32 input -> lora_B saves A's output. Under autocast lora_A casts
    its input back to bf16 and saves that. [cal: l32-1b lora/qlora, notes table 3] Under
    FSDP2 the adapters compute in bf16: the cast is a no-op, so without dropout lora_A
    saves x itself, shared with whatever else saved it (`x_saved`). [CPU trace]"""
    mask = in_dim if (ctx.lora_dropout and input_grad) else 0
    if ctx.autocast:
        return mask + 2 * in_dim + 2 * ctx.lora_r
    if ctx.adapters_bf16:
        x = 0 if (x_saved and not ctx.lora_dropout) else 2 * in_dim
        return mask + x + 2 * ctx.lora_r
    return mask + 4 * in_dim + 4 * ctx.lora_r


def _linears_saved(linears: list[Linear], in_dim: int, ctx: ActCtx, input_grad: bool,
                   input_shared: bool = False) -> int:
    """Saved by a group of Linears reading one tensor of width in_dim, per token."""
    saved, shared_saved = 0, False
    for lin in linears:
        if ctx.quant == "hqq4" or ctx.weights_train:
            # hqq's HQQMatmulNoCacheMul saves x; a trained weight needs x for its grad.
            if ctx.autocast and ctx.quant is None:
                saved += 2 * in_dim  # autocast casts the fp32 input once per Linear
            elif not shared_saved and not input_shared:
                saved += (2 if ctx.quant else ctx.stream) * in_dim
                shared_saved = True
        # frozen bf16 / nf4 base: grad_input needs only W, nothing of x is saved [notes 1, 3]
        if _lora_targeted(lin, ctx.setup):
            saved += _lora_saved(in_dim, ctx, input_grad, x_saved=shared_saved or input_shared)
            shared_saved = shared_saved or (ctx.adapters_bf16 and not ctx.autocast)
    return saved


def _attention_saved(spec: ModelSpec, layer: LayerSpec, ctx: ActCtx, seq: int) -> int:
    """SDPA (flash) saves q, k, v (after RoPE, bf16), the output and an fp32 logsumexp
    per head; the output layout is already what o_proj reads. [cal] With a fused qkv_proj
    (Phi-3) v is a view of the fused output, so the whole output stays alive. [CPU trace]
    Eager attention
    (Gemma 2) repeats k/v to all heads and keeps the seq x seq probabilities: tanh
    soft-cap output (bf16), fp32 softmax, bf16 probs. [transformers eager_attention_forward]"""
    q, kv, nh = spec.q_dim, spec.kv_dim, spec.n_heads
    if spec.attn_implementation == "sdpa":
        masked = _sdpa_mask_cols(spec, seq, layer)
        # with a mask transformers repeats k and v to every head (use_gqa_in_sdpa) and SDPA
        # saves those copies; a single kv head (MQA) repeats as a view of k, no copy
        # (repeat_kv's expand + reshape merges the size-1 head dim) [CPU trace]
        k_saved = _repeated_kv(spec) if masked else kv
        v = 2 * (q + 2 * kv) if layer.linears_with("qkv") and k_saved == kv else 2 * k_saved
        return 2 * q + 2 * k_saved + v + 2 * q + 4 * nh + 2 * masked
    # HF eager attention forms the full s x s scores even for sliding-window layers
    probs = nh * seq * (4 + 2 + (2 if spec.attn_logit_softcapping else 0))
    return 2 * q + 4 * _repeated_kv(spec) + probs  # q, repeated k, repeated v (o_proj's copy: _linears_saved)


def _repeated_kv(spec: ModelSpec) -> int:
    """Per token, k (or v) as repeat_kv hands it to every head: a copy for grouped heads, a
    view of k itself for a single kv head (the expand + reshape merges the size-1 dim)."""
    return spec.kv_dim if spec.n_kv_heads == 1 else spec.q_dim


def _attention_forward(spec: ModelSpec, layer: LayerSpec, ctx: ActCtx, seq: int) -> int:
    """Per token, attention's working set in a forward that saves nothing (checkpointing).
    SDPA: what it would save. Eager: at the softmax, q and the repeated k and v, the bf16
    masked scores, their fp32 copy (aten::softmax converts a bf16 input before _softmax on
    CUDA too; only fp16 takes the fused half-to-float path) and the fp32 probabilities:
    10 bytes per score, soft-cap or not, since each elementwise step frees its input.
    [CPU trace]"""
    if spec.attn_implementation == "sdpa":
        return _attention_saved(spec, layer, ctx, seq)
    return 2 * spec.q_dim + 4 * _repeated_kv(spec) + spec.n_heads * seq * (2 + 4 + 4)


def _sdpa_mask_cols(spec: ModelSpec, seq: int, layer: LayerSpec | None = None) -> int:
    """Mask columns per token that each SDPA call receives (of `layer`, or of any layer).
    transformers builds an explicit b x 1 x s x s bool mask for a sliding-window layer once
    the sequence reaches the window (masking_utils._ignore_causal_mask_sdpa), and torch's
    SDPA converts it to the query's dtype per call (aten::where), a copy its backward keeps:
    2·s bytes per token and layer. Where only some layers slide (Gemma 3), the full-attention
    layers stay mask-free. [CPU trace; the conversion precedes SDPA's kernel choice, so CUDA
    makes the same copy]"""
    window = spec.mask_window if layer is None else _layer_mask_window(spec, layer)
    return seq if window and seq >= window else 0


def _layer_mask_window(spec: ModelSpec, layer: LayerSpec) -> int | None:
    if spec.attn_implementation != "sdpa":
        return None
    return spec.sdpa_window or layer.sliding_window


def _mlp_saved(spec: ModelSpec, layer: LayerSpec, ctx: ActCtx, input_grad: bool) -> int:
    """Gated MLP: act saves its input gate (a view keeps a fused gate_up alive), the mul
    saves act(gate) and up, down_proj saves act*up only when its base needs it. [cal]"""
    h = spec.hidden
    if layer.experts:
        return _moe_saved(spec, layer, ctx, input_grad)
    ins = layer.linears_with("gate", "up", "gate_up", "fc1")
    downs = layer.linears_with("down", "fc2")
    if not ins or not downs:
        return 0
    f = downs[0].in_features
    saved = _linears_saved(ins, h, ctx, input_grad)
    gated = any(l.role in ("gate", "gate_up") for l in ins)
    saved += (6 * f) if gated else (2 * f)  # gated: gate, act(gate), up; plain: fc1 out
    saved += _linears_saved(downs, f, ctx, True)
    return saved


def _moe_saved(spec: ModelSpec, layer: LayerSpec, ctx: ActCtx, input_grad: bool) -> int:
    """transformers 5.x MixtralExperts: per routed token (top_k per token) the gathered
    input (when expert weights train), gate_up output (kept by the act's view), act out,
    act*up (when weights train) and the expert output saved by the routing-weight mul."""
    h, e = spec.hidden, layer.experts
    per_route = 4 * e.intermediate + 2 * e.intermediate + 2 * h
    if ctx.weights_train:
        per_route += 2 * h + 2 * e.intermediate
    router = ctx.stream * h if ctx.weights_train else 0
    router += 4 * e.num_experts * 2  # fp32 router softmax and its output
    return e.top_k * per_route + router + _linears_saved(layer.linears_with("gate", "up", "gate_up", "down"), h, ctx, input_grad)


def layer_saved_per_token(spec: ModelSpec, layer: LayerSpec, setup: TrainingSetup, input_grad: bool = True) -> int:
    """Bytes autograd saves per token in one decoder layer (no checkpointing)."""
    ctx = _act_ctx(setup)
    h = spec.hidden
    attn_in = layer.linears_with("q", "k", "v", "qkv")
    n_norms = max(spec.norms_per_layer, 1)
    saved = _norm_saved(spec, ctx, input_grad)
    saved += _linears_saved(attn_in, h, ctx, input_grad)
    # q_norm / k_norm: q and k need grad whatever trains (the layer's input does)
    saved += sum(_norm_saved(spec, ctx, True, width=w) for w in layer.attn_norm_dims)
    saved += _attention_saved(spec, layer, ctx, setup.seq_len)
    # o_proj reads the attention output, which SDPA already saved (same tensor)
    saved += _linears_saved(layer.linears_with("o"), spec.q_dim, ctx, True,
                            input_shared=spec.attn_implementation == "sdpa")
    saved += _norm_saved(spec, ctx, True) * (n_norms - 1)  # post-attn / pre-/post-ffw norms
    saved += _mlp_saved(spec, layer, ctx, True)
    return saved


@dataclass(frozen=True)
class LayerPoints:
    """Per-token bytes at the widest points of one decoder layer's backward, read from
    autograd's lifetimes (a saved tensor is freed once the node that saved it has run)
    and checked against the CPU trace of the real step (tests/test_cpu_trace.py)."""
    down_saved: int   # saved by the down projection (its input; LoRA's fp32 copy): freed first
    mlp_grads: int    # MLP elementwise backward: grad of act*up, of act, of up + the layer's output grad
    end_grads: int    # layer done: grad of its input + the residual grad
    lora_fwd: int     # widest peft LoRA Linear forward before down (fp32 B output, scaled, up-cast result, sum)
                      # + the layer's unsaved forward locals at that Linear
    lora_bwd: int     # first adapter reached in backward: lora_A's fp32 input grad + the output grad
    lora_inflight: int  # grads alive when checkpointing recomputes the layer: output grad + that
                        # first adapter's fp32 output grad (recompute starts inside its backward)
    quant_numel: int = 0  # QLoRA: weight elements of the first 4-bit Linear reached in backward
    quant_bwd: int = 0    # its input grad (bf16) while the output grad and its adapter's input grad live
    quant_freed: int = 0  # what its adapter saved, freed by then (peft's adapter branch runs first)
    hook_grads: int = 0   # grads in flight when an MLP weight's grad is accumulated (layer-wise optimizers)
    recompute_absent: int = 0  # saved tensors the recompute has not made yet at the widest adapter
    moe_fwd: int = 0      # MoE: the end of the experts' forward in the recompute (fp32 routing product)
    lora_down: int = 0    # down's adapter forward, the whole layer saved by then (same terms as lora_fwd)
    lora_down_rc: int = 0  # the same in the recompute, which stops before down's adapter path
    down_absent: int = 0  # saved tensors not made yet at down's adapter (Gemma 2's post-MLP norm)
    ckpt_fwd: int = 0     # checkpointed forward (nothing saved): the MLP's working set at its widest


_MLP_IN = ("gate", "up", "gate_up", "fc1", "down", "fc2")


def _lora_input_copy(in_dim: int, ctx: ActCtx) -> int:
    """Per token, the copy of x that peft's adapter path reads: x.to(lora_A's dtype) (fp32
    adapters), autocast's bf16 copy of the fp32 stream, none for bf16 adapters on a bf16
    stream. lora_A saves it, so only a forward that saves nothing counts it apart. [CPU trace]"""
    if ctx.autocast:
        return 2 * in_dim
    return 0 if ctx.adapters_bf16 else 4 * in_dim


def _lora_copy_local(in_dim: int, ctx: ActCtx) -> int:
    """That copy when it is a local, not saved: with dropout lora_A saves dropout(x) instead
    (under autocast lora_A's own bf16 cast of dropout(x) is what it saves)."""
    return _lora_input_copy(in_dim, ctx) if ctx.lora_dropout and not ctx.autocast else 0


def _forward_locals(h: int, stream: int) -> int:
    """Per token, what a model's forward holds that no node saved: the embedding output (held
    until the model's forward returns) and the current block's input, unless x.to(fp32)
    made the saved copy of it a no-op (an fp32 stream under autocast). [CPU trace]"""
    return stream * h + (0 if stream == 4 else stream * h)


def _ckpt_forward(spec: ModelSpec, layer: LayerSpec, f: int, gated: bool, residual: int, lora_mlp: int) -> int:
    """Per token, a checkpointed layer's forward at the MLP: the residual stream after
    attention and the MLP's input, then act(gate), up and their product (a fused gate_up,
    and MoE experts, keep the whole fused output behind the views; MoE also the gathered
    expert inputs; a plain MLP: fc1's output and its activation); with an adapted gate/up,
    that adapter's path on top of act(gate) and the up projection's base output. [CPU trace]"""
    fused = bool(layer.linears_with("gate_up")) or bool(layer.experts)
    # the MLP's input is the norm's output, or (post-norm) the residual stream itself
    mlp = (8 * f if fused else 6 * f if gated else 4 * f) + (2 if layer.pre_norm else 1) * residual
    if layer.experts:
        mlp += 2 * layer.experts.top_k * spec.hidden
    return max(mlp, (4 * f if gated else 2 * f) + lora_mlp) if lora_mlp else mlp


def _moe_forward_end(spec: ModelSpec, layer: LayerSpec, residual: int, weights_train: bool) -> int:
    """Per token, at the end of an MoE block's forward (recompute under checkpointing):
    each routed expert output times its fp32 routing weight (the bf16 output up-cast, and
    the product), the forward's locals (the residual stream after attention; the block's
    input and the gathered expert inputs unless the trained router and experts saved
    them), with the layer's output grad and the fp32 grad of the routed outputs in flight."""
    if not layer.experts:
        return 0
    routed = layer.experts.top_k * spec.hidden
    locals_ = residual + (0 if weights_train else residual + 2 * routed)
    return 4 * routed + 4 * routed + locals_ + residual + 4 * routed


def _shape_key(layer: LayerSpec) -> tuple:
    """Everything about a layer that the per-layer rules read."""
    e = layer.experts
    experts = None if e is None else (e.num_experts, e.top_k, e.hidden, e.intermediate,
                                      tuple((n, tuple(shape)) for n, shape in e.tensors))
    return (tuple((l.role, l.in_features, l.out_features, l.bias) for l in layer.linears),
            experts, tuple(layer.norm_numels), tuple(layer.attn_norm_dims), tuple(layer.norm_names),
            tuple(layer.other_numels), layer.sliding_window)


def layer_points(spec: ModelSpec, layer: LayerSpec, setup: TrainingSetup) -> LayerPoints:
    ctx = _act_ctx(setup)
    h = spec.hidden
    downs = layer.linears_with("down", "fc2")
    gated = bool(layer.linears_with("gate", "gate_up")) or bool(layer.experts)
    if layer.experts:
        f, down_saved = layer.experts.intermediate * layer.experts.top_k, 0
    else:
        f = downs[0].in_features if downs else h
        down_saved = _linears_saved(downs, f, ctx, True) if downs else 0
    residual = 4 * h if setup.autocast else 2 * h
    # peft lora.Linear.forward: result + lora_B(lora_A(x)) * scaling in the adapter dtype,
    # then .to(result dtype). fp32 adapters: the scaled fp32 B output, the result up-cast
    # and their sum (12·out); bf16 adapters (autocast, FSDP2): B's output is freed after
    # the scaling, so the scaled output and the sum (4·out) [CPU trace]
    per_out = 4 if ctx.adapters_bf16 else 12
    adapted = [l for l in layer.linears if _lora_targeted(l, setup)]
    # plus the layer's forward locals: inside the MLP the residual stream after attention,
    # the norm's output feeding the Linear unless a node saved that very tensor (lora_A:
    # bf16 adapters without autocast and without dropout; hqq's matmul), and the copy of it
    # peft's adapter reads when dropout, not lora_A, consumed it [CPU trace, dropout as CUDA
    # holds it]
    norm_saved = (ctx.adapters_bf16 and not ctx.autocast and not ctx.lora_dropout) or ctx.quant == "hqq4"
    # post-norm layers (OLMo2) feed the blocks the residual stream itself, already counted
    norm_out = 0 if norm_saved or not layer.pre_norm else residual

    def at(lin: Linear) -> int:
        return (per_out * lin.out_features + norm_out + _lora_copy_local(lin.in_features, ctx)
                + (residual if lin.role in _MLP_IN else 0))

    widest = max((l for l in adapted if l.role not in ("down", "fc2")), key=at, default=None)
    lora_fwd = at(widest) if widest else 0
    # down's adapter runs last, with the whole MLP saved: its input, act(gate)*up, is a
    # local unless a node saved it, plus the copy the adapter reads under dropout. In the
    # recompute, torch's checkpoint stops early once lora_B has saved its input, the last
    # tensor the layer saves: only the base's bf16 result exists there, not the adapter path
    dn = next((l for l in adapted if l.role in ("down", "fc2")), None)
    lora_down = lora_down_rc = 0
    if dn is not None:
        # (the decoder layer still holds the norm's output it passed to the MLP)
        common = (0 if norm_saved else 2 * dn.in_features) + _lora_copy_local(dn.in_features, ctx) + norm_out + residual
        lora_down, lora_down_rc = per_out * dn.out_features + common, 2 * dn.out_features + common
    # a fused gate_up runs before the activation exists, which the layer's saved count holds
    absent = 2 * f if widest is not None and widest.role == "gate_up" else 0
    # Gemma 2's post-feedforward norm runs after the MLP: its saved fp32 input does not exist
    # yet at an MLP adapter, and its backward, not down's adapter, starts the recompute
    post_mlp_norm = layer.post_mlp_norm and widest is not None and widest.role in _MLP_IN
    if post_mlp_norm:
        absent += _norm_saved(spec, ctx, True)
    # a forward that saves nothing (checkpointing) holds the norm's output and the adapter's
    # input copy as locals (dropout's output and mask are freed once lora_A ran)
    ckpt_lora = (per_out * widest.out_features + (2 if layer.pre_norm else 1) * residual
                 + _lora_input_copy(widest.in_features, ctx)
                 if widest is not None and widest.role in _MLP_IN else 0)
    # backward meets the adapters in reverse forward order: down first, else o_proj
    first = next((l for roles in (("down", "fc2"), ("o",)) for l in adapted if l.role in roles), None)
    width = 2 if ctx.adapters_bf16 else 4
    lora_bwd = width * first.in_features + residual if first else 0
    # fp32 adapters: peft's `result + lora_out` promotes to fp32, so its backward also hands
    # the base branch a bf16 copy of the output grad
    lora_inflight = (width + (0 if ctx.adapters_bf16 else 2)) * first.out_features + residual if first else 0
    if post_mlp_norm:  # the layer's output grad and that norm's fp32 output grad
        lora_inflight = residual + 4 * h
    # QLoRA: that Linear's base dequantizes its whole weight to make its input grad
    # (bnb MatMul4Bit.backward, hqq HQQMatmulNoCacheMul.backward)
    quant = next((l for roles in (("down", "fc2"), ("o",)) for l in layer.linears if l.role in roles),
                 None) if setup.method == Method.QLORA else None
    quant_bwd = freed = 0
    if quant:
        # autograd runs the adapter branch (created after the base's node) first: its input
        # grad is back in bf16 and what it saved is freed when the base dequantizes
        adapted_q = _lora_targeted(quant, setup)
        quant_bwd = residual + (2 if adapted_q else 1) * 2 * quant.in_features
        freed = _lora_saved(quant.in_features, ctx, True, x_saved=ctx.quant == "hqq4") if adapted_q else 0
    return LayerPoints(down_saved=down_saved, mlp_grads=(3 if gated else 2) * 2 * f + residual,
                       end_grads=2 * residual, lora_fwd=lora_fwd, lora_down=lora_down, lora_down_rc=lora_down_rc,
                       lora_bwd=lora_bwd,
                       down_absent=_norm_saved(spec, ctx, True) if layer.post_mlp_norm and lora_down else 0,
                       lora_inflight=lora_inflight,
                       quant_numel=quant.numel if quant else 0, quant_bwd=quant_bwd, quant_freed=freed,
                       hook_grads=residual + 2 * f + 2 * h, recompute_absent=absent,
                       moe_fwd=_moe_forward_end(spec, layer, residual, ctx.weights_train),
                       ckpt_fwd=max(_ckpt_forward(spec, layer, f, gated, residual, ckpt_lora),
                                    # at the attention, with the norm's output (post-norm: the
                                    # layer's input, which the checkpoint holds anyway)
                                    _attention_forward(spec, layer, ctx, setup.seq_len)
                                    + (residual if layer.pre_norm else 0)))


# ------------------------------------------------------------------ the step

@dataclass
class StepModel:
    phases: list[Phase]
    host_pinned: int
    notes: list[str]

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda p: p.allocated)


def _static(params: list[Param], setup: TrainingSetup, world: int, offload: bool) -> tuple[dict, int, int, int]:
    """Persistent bytes on the GPU (by category), plus grads, optimizer and host-pinned totals."""
    parts: dict = {}
    grads = optim = host = 0
    for p in params:
        n = _shard(p, world)
        store = _store(p, setup, n)
        g = _r(_grad_bytes(p, setup) * n)
        s = _optimizer_state(p, setup, n)
        if p.kind in ("nf4", "hqq4") and world > 1:
            # FSDP2 shards Parameters only. The packed weight is one, the quantization state
            # is not: bnb keeps quant_state on the module (Params4bit._quantize sets
            # module.quant_state), hqq keeps scale/zero in HQQLinear.meta (quantize.py: only
            # W_q becomes an nn.Parameter). So the state stays whole on every rank and on
            # the GPU under CPU offload. [notes 5; read from the sources, not yet measured]
            store[C.QUANT_STATE] = _store(p, setup)[C.QUANT_STATE]
        if offload:
            host += sum(v for c, v in store.items() if c != C.QUANT_STATE) + g + s
            if C.QUANT_STATE in store:
                parts[C.QUANT_STATE] = parts.get(C.QUANT_STATE, 0) + store[C.QUANT_STATE]
            continue
        for c, v in store.items():
            parts[c] = parts.get(c, 0) + v
        grads += 0 if setup.optim.layerwise else g
        optim += s
    return parts, grads, optim, host


def _unit_bytes(params: list[Param], setup: TrainingSetup, world: int) -> dict[int | None, int]:
    """All-gathered (unsharded, padded) bytes of each FSDP unit: decoder layers and the root."""
    units: dict[int | None, int] = {}
    for p in params:
        units[p.layer] = units.get(p.layer, 0) + _r(_compute_bytes(p, setup) * _shard(p, world) * world // max(p.numel, 1))
    return units


def _unit_grad_bytes(params: list[Param], setup: TrainingSetup, layer: int | None, reduce_bytes: int) -> tuple[int, int]:
    """(unsharded grads in param_dtype, reduce-scatter input in reduce_dtype) of one unit."""
    n = sum(p.numel for p in params if p.layer == layer and p.trainable)
    return 2 * n, reduce_bytes * n


@dataclass(frozen=True)
class Prepared:
    """The token-independent part of step_model for one (spec, setup without batch/seq).
    The planner evaluates each configuration at several token counts; sharing this part
    makes that cheaper without changing any result."""
    spec: ModelSpec
    key: TrainingSetup
    params: list
    static: tuple
    units: dict


def _token_free_key(setup: TrainingSetup) -> TrainingSetup:
    return setup.model_copy(update={"batch_size": 1, "seq_len": 1})


def prepare(spec: ModelSpec, setup: TrainingSetup) -> Prepared:
    params = parameters(spec, setup)
    static = _static(params, setup, setup.fsdp, setup.cpu_offload)
    units = _unit_bytes(params, setup, setup.fsdp) if setup.fsdp > 1 else {}
    return Prepared(spec, _token_free_key(setup), params, static, units)


def step_model(spec: ModelSpec, setup: TrainingSetup, every_layer: bool = False,
               prepared: Prepared | None = None) -> StepModel:
    """All phases of one step. every_layer=True keeps one "layer backward" phase per decoder
    layer instead of only the worst (each is then affine in the token count, which the
    planner relies on). `prepared` (from prepare()) is reused only when it was made for
    this spec and this setup up to batch_size/seq_len; otherwise it is recomputed."""
    world = setup.fsdp
    offload = setup.cpu_offload
    if prepared is None or prepared.spec is not spec or prepared.key != _token_free_key(setup):
        prepared = prepare(spec, setup)
    params = prepared.params
    static, grads, optim_state, host = prepared.static
    N, V, h = setup.tokens, spec.vocab, spec.hidden
    notes: list[str] = []

    # ---- activations saved through the step
    ckpt = setup.gradient_checkpointing
    first_grad = setup.method in (Method.FULL, Method.GALORE) or ckpt  # enable_input_require_grads
    saved_of: dict = {}  # most models repeat one layer shape: compute each shape once
    per_layer = []
    for i, l in enumerate(spec.layers):
        key = (_shape_key(l), i > 0 or first_grad)
        if key not in saved_of:
            saved_of[key] = layer_saved_per_token(spec, l, setup, input_grad=key[1])
        per_layer.append(saved_of[key])
    stream = 4 if setup.autocast else 2
    # RoPE cos/sin are computed once and saved by every layer's multiply (shared tensors)
    rope = 2 * _r(N * spec.head_dim * stream)
    inputs = _r(N * INPUT_BYTES_PER_TOKEN)
    if ckpt:
        # non-reentrant checkpointing keeps each layer's input hidden state
        layer_acts = sum(_r(N * stream * h) for _ in spec.layers)
    else:
        layer_acts = sum(_r(N * a) for a in per_layer)
    eager_mask = 0
    if spec.attn_implementation == "eager":
        kinds = 1 + any(l.sliding_window for l in spec.layers)
        eager_mask = kinds * _r(2 * setup.batch_size * setup.seq_len ** 2)  # bf16 additive masks
    head_trains = setup.method in (Method.FULL, Method.GALORE)
    ctx = _act_ctx(setup)
    final = N * _norm_saved(spec, ctx, True)
    if head_trains:
        final += N * (2 if (ctx.autocast or ctx.stream == 2) else 4) * h  # lm_head saves its input
    # the bool sliding-window mask itself, built once and passed to every layer
    sdpa_mask = _r(setup.batch_size * setup.seq_len * _sdpa_mask_cols(spec, setup.seq_len))
    acts = layer_acts + rope + inputs + eager_mask + sdpa_mask + _r(final)

    # ---- autocast caches bf16 casts of trainable fp32 weights; they are saved for
    # backward (without checkpointing every layer's; with it only the root's lm_head). [cal]
    cast_cache = 0
    if setup.autocast and head_trains:
        for p in params:
            if p.trainable and p.kind == "dense" and p.numel != p.dim0 and (not ckpt or p.layer is None):
                if p.layer is not None or p.dim0 == V:
                    cast_cache += _r(2 * p.numel)

    # ---- logits and loss (transformers ForCausalLMLoss: logits.float(), log_softmax saved)
    held = 2 * N * V * (2 if spec.final_logit_softcapping else 1)  # bf16 logits (+ tanh output)
    loss_fwd = held + 8 * N * V            # + fp32 copy + log-softmax [notes 7, cal]
    loss_bwd = held + 12 * N * V           # log-softmax saved + its grad in + grad out [cal]

    # ---- FSDP buffers
    units = prepared.units
    layer_unit = max((v for k, v in units.items() if k is not None), default=0)
    root_unit = units.get(None, 0)
    reduce_bytes = 4 if setup.precision == Precision.MIXED else 2

    def base(name: str, with_grads: bool = False) -> Phase:
        ph = Phase(name)
        for c, v in static.items():
            ph.add(c, v)
        ph.add(C.OPTIMIZER_STATES, optim_state)
        if with_grads:
            ph.add(C.GRADIENTS, grads)
        return ph

    phases: list[Phase] = []
    # forward end, inside the loss
    ph = base("forward (loss)").add(C.ACTIVATIONS, acts + cast_cache).add(C.TRANSIENT, loss_fwd)
    if world > 1:
        # root unit is not resharded after forward; the last unit's all-gather output is
        # held by FSDP's AllGatherState until the next unshard. [cal: fsdp2 l32-1b]
        ph.add(C.FSDP_BUFFERS, root_unit + layer_unit)
    phases.append(ph)

    if spec.final_norm_numel and spec.norm_kind != "layer":
        # the final norm's forward: every saved tensor exists, plus its fp32 normalized
        # product and the forward's locals (its input, the embedding output). The peak of
        # forward with a small vocabulary. [CPU trace]
        ph = base("forward (final norm)").add(C.ACTIVATIONS, acts + cast_cache)
        ph.add(C.TRANSIENT, _r(N * (4 * h + _forward_locals(h, stream))))
        if world > 1:
            ph.add(C.FSDP_BUFFERS, root_unit + layer_unit)
        phases.append(ph)

    ph = base("loss backward").add(C.ACTIVATIONS, acts + cast_cache).add(C.TRANSIENT, loss_bwd)
    if world > 1:
        ph.add(C.FSDP_BUFFERS, root_unit + layer_unit)
    phases.append(ph)

    if spec.final_norm_numel and spec.norm_kind != "layer":
        # the final norm's fp32 backward, every layer's saved tensors still alive. Of the
        # root's, only the norm's fp32 input is: lm_head's saved input and the weight
        # multiply's are freed once their nodes ran, and the incoming grad once the weight
        # multiply consumed it (nothing else reads it: no residual after the final norm)
        # [CPU trace]
        ph = base("final norm backward").add(C.ACTIVATIONS, acts - _r(final) + _r(N * 4 * h) + cast_cache)
        ph.add(C.TRANSIENT, _r(N * RMS_NORM_BACKWARD * h))
        if world > 1:
            ph.add(C.FSDP_BUFFERS, root_unit + layer_unit)
        phases.append(ph)

    # decoder-layer backward: grads accumulate while activations are released
    # layer-wise optimizers: each parameter's hook steps it inside backward
    hook = _layerwise_hook_bytes(params, setup) if setup.optim.layerwise else {}
    layer_phases = _layer_backward_phases(spec, setup, params, base, per_layer, acts, layer_acts, cast_cache, hook,
                                          _r(final), world, units, reduce_bytes, offload)
    phases.extend(layer_phases if every_layer else [max(layer_phases, key=lambda p: p.allocated)])
    if hook.get(None) and not offload:  # lm_head's (or the embedding's) hook, all saved tensors alive
        phases.append(base("optimizer hook (lm_head)").add(C.ACTIVATIONS, acts + cast_cache)
                      .add(C.TRANSIENT, _r(N * stream * h) + hook[None]))
    fwd_layer = _layer_forward_phase(spec, setup, base, acts, _r(final), cast_cache)
    if fwd_layer is not None:
        if world > 1:
            fwd_layer.add(C.FSDP_BUFFERS, root_unit + 2 * layer_unit)
        phases.append(fwd_layer)

    # 4-bit dequantization in forward (in backward: a layer point)
    if setup.method == Method.QLORA:
        biggest = max((p.numel for p in params if p.kind in ("nf4", "hqq4")), default=0)
        deq = _dequantize_transient(biggest, setup.quant)
        ph = base("4-bit dequantize (forward)").add(C.ACTIVATIONS, acts).add(C.TRANSIENT, deq)
        if world > 1:  # this unit and the one prefetched, and the root
            ph.add(C.FSDP_BUFFERS, root_unit + 2 * layer_unit)
        phases.append(ph)

    if setup.method == Method.QLORA:
        phases.append(_build_phase(params, setup, world))

    # optimizer step (on the CPU under offload)
    if not offload:
        # the batch's token ids (input_ids, reused as labels) are still held by the loop
        ph = base("optimizer step", with_grads=True).add(C.ACTIVATIONS, _r(N * 8)).add(
            C.TRANSIENT, _optimizer_transient(params, setup, world))
        if not setup.optim.layerwise:
            phases.append(ph)
        if setup.method == Method.GALORE:
            phases.append(_galore_refresh_phase(params, setup, static, grads, optim_state))
    host_total = host
    if offload:
        notes.append("CPU offload: sharded parameters, gradients and optimizer states live in pinned host "
                     "memory and the optimizer steps on the CPU.")
    return StepModel(phases=phases, host_pinned=host_total, notes=notes)


def _dequantize_transient(n: int, quant: Quant) -> int:
    """A 4-bit Linear's whole weight, dequantized for one matmul. bitsandbytes: the bf16
    weight plus the nested absmax dequantized to fp32. hqq (PyTorch backend,
    Quantizer.dequantize): unpacked into the compute dtype, minus zero, times scale: three
    bf16 copies alive at once. [CPU trace: 2.11 and 6.02 bytes per element]"""
    if quant == Quant.NF4:
        return _r(2 * n) + _r(n // 8)
    return 3 * _r(2 * n)


def _build_phase(params: list[Param], setup: TrainingSetup, world: int) -> Phase:
    """QLoRA's build peak: verify quantizes the decoder's Linears one at a time on the
    device before anything else is materialized, so at the largest Linear the device holds
    the 4-bit decoder so far plus that Linear's quantization temporaries. Under FSDP2 each
    packed weight goes back to meta once quantized (its shard is allocated later), and
    only the quantization state, which stays whole on every rank, accumulates."""
    quantized = [p for p in params if p.kind in ("nf4", "hqq4")]
    ph = Phase("build (quantize)")
    for p in quantized:
        store = _store(p, setup)
        ph.add(C.QUANT_STATE, store[C.QUANT_STATE])
        if world == 1:
            ph.add(C.WEIGHTS, store[C.WEIGHTS])
    if quantized:
        ph.add(C.TRANSIENT, _quantize_transient(max(quantized, key=lambda p: p.numel), world))
    return ph


def _quantize_transient(p: Param, world: int) -> int:
    n, packed = p.numel, _r(p.numel / 2)
    if p.kind == "nf4":  # the packed output exists while the source is still alive
        held = packed if world > 1 else 0
        return _r(NF4_QUANTIZE_BYTES * n) + _r(NF4_QUANTIZE_BLOCK_BYTES * -(-n // NF4_BLOCK)) + held
    # hqq packs only after its optimization loop has freed the working copies
    done = packed if world == 1 else 0
    return _r(HQQ_QUANTIZE_BYTES * n) + _r(HQQ_QUANTIZE_GROUP_BYTES * -(-n // HQQ_GROUP)) - done


def _layer_backward_phases(spec, setup, params, base, per_layer, acts, layer_acts, cast_cache, hook, released,
                           world, units, reduce_bytes, offload) -> list[Phase]:
    """Each decoder layer's backward (top to bottom), as its widest points: the recompute
    of a LoRA Linear (checkpointing), the MLP's elementwise backward (down's saved input
    already freed, only down's weight grads made) and the layer's end (its saved tensors
    freed, all its grads made). What the final norm and lm_head saved is freed before."""
    N = setup.tokens
    ckpt = setup.gradient_checkpointing
    sharded = {}
    down = {}
    for p in params:
        if p.trainable:
            g = _r(_grad_bytes(p, setup) * _shard(p, world))
            sharded[p.layer] = sharded.get(p.layer, 0) + g
            if p.role in ("down", "fc2"):
                down[p.layer] = down.get(p.layer, 0) + _r(_grad_bytes(p, setup) * p.numel)
    if offload or setup.optim.layerwise:
        sharded = {k: 0 for k in sharded}
    if setup.optim.layerwise:
        down = {}
    by_layer: dict[int | None, list[Param]] = {}
    for p in params:  # _unit_grad_bytes filters by layer: give it only that layer's (same result, O(P))
        by_layer.setdefault(p.layer, []).append(p)
    non_layer = acts - layer_acts - released
    points_of: dict = {}
    out: list[Phase] = []
    done_grads = sharded.get(None, 0)
    remaining = layer_acts
    for i in range(len(spec.layers) - 1, -1, -1):
        key = _shape_key(spec.layers[i])
        if key not in points_of:
            points_of[key] = layer_points(spec, spec.layers[i], setup)
        pts = points_of[key]
        this = _r(N * per_layer[i])
        kept = non_layer + remaining - (0 if ckpt else this)  # saved outside this layer's own
        ug, rs = _unit_grad_bytes(by_layer.get(i, []), setup, i, reduce_bytes) if world > 1 else (0, 0)
        # FSDP2: this unit + the one it prefetches (the previous in forward order; layer 0
        # has none: FSDPParamGroup._backward_prefetch) + the root (kept unsharded); the
        # unit's grads are unsharded until its post-backward reduce-scatter [notes 5]
        gathered = (2 * units.get(i, 0) if i > 0 else units.get(i, 0)) + units.get(None, 0) if world > 1 else 0
        down_share = ug * down.get(i, 0) // max(sum(_r(_grad_bytes(p, setup) * p.numel)
                                                    for p in by_layer.get(i, []) if p.trainable), 1)
        # the previous unit's reduce-scatter input is held until this unit's post-backward
        rs_prev = _r(rs) if world > 1 and i < len(spec.layers) - 1 else 0
        points = [
            ("mlp", this - _r(N * pts.down_saved), _r(N * pts.mlp_grads),
             done_grads + (0 if world > 1 else down.get(i, 0)), gathered + _r(down_share) + rs_prev),
            ("end", 0, _r(N * pts.end_grads), done_grads + sharded.get(i, 0), gathered + _r(ug) + _r(rs)),
        ]
        if pts.lora_bwd:
            points.append(("lora", this, _r(N * pts.lora_bwd), done_grads, gathered + rs_prev))
        if pts.quant_numel:
            points.append(("4-bit dequantize", this - _r(N * pts.quant_freed), _r(N * pts.quant_bwd) + _dequantize_transient(
                pts.quant_numel, setup.quant), done_grads, gathered + rs_prev))
        if ckpt and pts.lora_fwd:
            points.append(("lora recompute", this - _r(N * (pts.down_saved + pts.recompute_absent)),
                           _r(N * (pts.lora_fwd + pts.lora_inflight)), done_grads, gathered + rs_prev))
        if ckpt and pts.lora_down_rc:
            points.append(("lora recompute (down)", this - _r(N * pts.down_absent),
                           _r(N * (pts.lora_down_rc + pts.lora_inflight)), done_grads, gathered + rs_prev))
        if spec.layers[i].post_mlp_norm and spec.norm_kind != "layer":
            # a post-MLP norm (Gemma 2) runs its fp32 backward first, with the whole layer alive
            points.append(("post-MLP norm", this, _r(N * ((4 if setup.autocast else 2) + RMS_NORM_BACKWARD) * spec.hidden),
                           done_grads, gathered + rs_prev))
        if ckpt and pts.moe_fwd:
            points.append(("moe recompute", this, _r(N * pts.moe_fwd), done_grads, gathered + rs_prev))
        if hook.get(i):
            # a weight's grad is accumulated: its optimizer steps inside the hook while its
            # matmul's input grad and the MLP's other grads are in flight
            points.append(("optimizer hook", this - _r(N * pts.down_saved), _r(N * pts.hook_grads) + hook[i],
                           done_grads, gathered + rs_prev))
        for tag, live, tr, grads, fsdp in points:
            ph = base(f"layer {i} backward ({tag})").add(C.ACTIVATIONS, kept + live + cast_cache)
            ph.add(C.TRANSIENT, tr).add(C.GRADIENTS, grads)
            if world > 1:
                ph.add(C.FSDP_BUFFERS, fsdp)
            out.append(ph)
        done_grads += sharded.get(i, 0)
        remaining -= _r(N * (2 if not setup.autocast else 4) * spec.hidden) if ckpt else this
    return out


def _layerwise_hook_bytes(params: list[Param], setup: TrainingSetup) -> dict[int | None, int]:
    """Per decoder layer (None: the root), the largest full gradient plus its optimizer's
    update temporaries: what one post-accumulate-grad hook adds while it steps."""
    out: dict[int | None, int] = {}
    for p in params:
        if p.trainable:
            b = _r(_grad_bytes(p, setup) * p.numel) + _optimizer_transient([p], setup, 1)
            out[p.layer] = max(out.get(p.layer, 0), b)
    return out


def _layer_forward_phase(spec, setup, base, acts, released, cast_cache) -> Phase | None:
    """The last decoder layer's forward without checkpointing, at its widest LoRA Linear:
    everything saved so far plus peft's fp32 adapter path."""
    pts = layer_points(spec, spec.layers[-1], setup)
    N = setup.tokens
    if setup.gradient_checkpointing:
        # checkpointing's forward keeps none of the layer's saved tensors: only the MLP's
        # working set is alive (its recompute in backward is wider; this is forward's peak)
        return base("forward (checkpointed layer)").add(C.ACTIVATIONS, acts - released + cast_cache).add(
            C.TRANSIENT, _r(N * pts.ckpt_fwd))
    if not pts.lora_fwd and not pts.lora_down:
        return None
    # at the widest adapter before down (down's saved input not made yet) or at down's
    live, transient = max(((acts - released - _r(N * pts.down_saved), _r(N * pts.lora_fwd)),
                           (acts - released - _r(N * pts.down_absent), _r(N * pts.lora_down))),
                          key=lambda lt: lt[0] + lt[1] if lt[1] else -1)
    locals_ = _r(N * _forward_locals(spec.hidden, 4 if setup.autocast else 2))
    return base("forward (last layer)").add(C.ACTIVATIONS, live + cast_cache).add(C.TRANSIENT, transient + locals_)


def _galore_refresh_phase(params, setup, static, grads, optim_state) -> Phase:
    """Step 0 (and every update_proj_gap steps): SVD of one fp32 gradient at a time."""
    # layer-wise optimizers refresh inside their backward hooks
    ph = Phase("GaLore SVD refresh" + (" (layer-wise, in backward)" if setup.optim.layerwise else ""))
    for c, v in static.items():
        ph.add(c, v)
    ph.add(C.OPTIMIZER_STATES, optim_state)
    ph.add(C.GRADIENTS, grads if not setup.optim.layerwise else 0)
    ph.add(C.TRANSIENT, _svd_transient(params, setup))
    return ph
