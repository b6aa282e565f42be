"""torch.compile as torchtune runs it (`compile: True`, --compile): what changes in memory.

torchtune==0.3.1 torchtune/training/_compile.py:25-86 (0.6.1: 25-76): compile_model calls
`.compile()` on every TransformerSelfAttentionLayer (per layer; the whole model on torch < 2.5
in 0.3.1), compile_loss replaces CEWithChunkedOutputLoss.compute_cross_entropy, the upcast and
F.cross_entropy of one chunk, by its torch.compile; the chunking itself stays eager (the
recipes: lora_finetune_single_device.py:270-271, full_finetune_single_device.py:234-235,
*_distributed.py the same). Sources and the CPU trace: docs/memory-model.md, "torch.compile".

The chunked loss compiled (traced on the CPU with torchtune 0.3.1's loss, case
"torchtune-chunked-compiled-lora" of tests/data/cpu/trace.jsonl; inductor's output code):
AOT autograd's partition saves each chunk's own logits (bf16), its labels and two fp32 values
per row (amax, log of the sum of exponentials); the forward's upcast, log-softmax and NLL are
reductions fused into one kernel, so no [rows, V] fp32 tensor is made. Its backward is one
pointwise kernel writing the chunk's grad in the chunk's dtype, then freeing the saved chunk.
So the 8 chunks of logits, which the eager loss frees when the recipe drops them
(`del logits`), stay alive until backward, in place of the eager loss's 8 fp32 log-softmaxes
(half the bytes); the autograd engine runs the 8 loss backwards before the output layer's
(the loss nodes are newer), each adding a chunk's grad as it frees a saved chunk.

The compiled decoder layers of a full fine-tune without checkpointing (compiled_layer,
compiled_norm_saved, compiled_mlp_parts), where every layer's saves live from its forward to
its backward: AOT autograd's min-cut partitioner (torch==2.13 torch/_functorch/partitioners.py
min_cut_rematerialization_partition) saves what a matmul or SDPA needs and recomputes cheap
pointwise ops in the backward graph. Per token, the tensors a compiled transformers
LlamaDecoderLayer saves (scripts/compile_saved_tensors.py: a saved_tensors_hooks pack hook,
torch 2.13 inductor on the CPU; the step: group "compile" of tests/data/cpu/trace.jsonl,
cases "torchtune-compile-layers-full-*", within 1% per phase):
  - each RMSNorm: its input (bf16, 2h) and its rstd (fp32, 4 bytes); eager saves the fp32
    upcast (4h) and, with a trained weight, the normalized bf16 output (2h): 6h -> 2h + 4
  - q/k/v's input (the normalized output, 2h), RoPE'd q and k, v, SDPA's output and logsumexp,
    o_proj's input (SDPA's output): as eager
  - the gated MLP: gate/up's input (2h), gate's and up's outputs (2f each), down's input
    act(gate)*up (2f); act(gate) (2f) is recomputed from gate's output in backward
  - the residual adds: nothing, as eager.
Full Llama, per layer in N·h·2 units (h 256, f 768): 22.56 eager -> 15.58 compiled (the pack
hook: 22.70 -> 15.70 with RoPE's cos/sin). The backward's working set stays the eager layer's
(layer.LayerPoints): the compiled full layer's is narrower (scripts/compile_backward_probe.py
full: 4.50 N·h·2 above the end of forward against 6.00 eager), so the eager moments bound it
from above (max(eager, compiled)); in the traced cases the loss or the eager final norm's
backward is the peak, not a layer's.
Left eager: LoRA and QLoRA layers (the compiled backward's working set is wider than eager:
12.1 vs 5.9 N·h·2 with bf16 adapters, 21.1 vs 7.2 with fp32 ones, not yet a moment of its
own), checkpointed layers (the recompute and its backward are not traced within 2%),
activation offload, an fp32 stream, models without Llama-style pre-norm RMSNorms (Gemma,
OLMo2, LayerNorm), and inside a compiled layer q/k norms, plain and MoE MLPs: each keeps the
eager layer's saved tensors, an upper bound (docs/memory-model.md, "torch.compile")."""

from __future__ import annotations

from vramplan.memory.context import ActivationContext, activation_context
from vramplan.memory.mlp import is_gated
from vramplan.model_spec import LayerSpec, ModelSpec
from vramplan.setup import ActivationOffload, Loss, Stack, TrainingSetup

# Per row of a chunk the compiled graph saves two fp32 reductions (amax, log-sum-exp):
# inductor's output code for F.cross_entropy(x.float(), y, reduction="sum"), torch 2.13.
SAVED_ROW_BYTES = 8
# A compiled RMSNorm saves one fp32 rstd per row beside its input: the partition of
# x * rsqrt(mean(x.float()**2) + eps), torch 2.13 inductor (traced [B, S, 1] fp32).
RSTD_BYTES = 4


def compiled_setup(ctx: ActivationContext) -> bool:
    """Whether the setup has its decoder layers modelled compiled: --compile on a full
    fine-tune (weights and norms train) of a bf16 stream, without checkpointing or activation
    offload, where the compiled layer's saves were traced within 2% (CPU trace, group
    "compile")."""
    s = ctx.setup
    return (
        s.compile
        and ctx.weights_train
        and ctx.norms_train
        and ctx.stream == 2
        and not s.gradient_checkpointing
        and s.activation_offload == ActivationOffload.NONE
    )


def compiled_layer(spec: ModelSpec, ctx: ActivationContext) -> bool:
    """compiled_setup on a model of the traced kind: Llama-style RMSNorms (x.float(), weight *
    x.to(dtype)) in front of the attention and the MLP, none on a block's output (Gemma's and
    OLMo2's norms, LayerNorm: the eager layer, an upper bound)."""
    return (
        compiled_setup(ctx) and spec.norm_kind == "rms" and all(l.pre_norm and not l.post_mlp_norm for l in spec.layers)
    )


def compiled_norm_saved(spec: ModelSpec, ctx: ActivationContext, eager: int) -> int:
    """Per token, what one of a compiled layer's own RMSNorms saves: its input (stream dtype)
    and its fp32 rstd, where eager saves the fp32 upcast and the normalized output. `eager` is
    norms.norm_saved's figure: a norm with no autograd node (0) and LayerNorm stay as eager."""
    if not compiled_layer(spec, ctx) or not eager:
        return eager
    return ctx.stream * spec.hidden + RSTD_BYTES


def compiled_forward_locals(spec: ModelSpec, ctx: ActivationContext, eager: int) -> int:
    """Per token, the forward's locals at the final norm (layer.forward_locals, `eager`): the
    embedding output, held by the model's forward, is the first compiled layer's input, which
    its RMSNorm saves (compiled_norm_saved counts it), so it is not counted twice. [CPU trace:
    "torchtune-compile-layers-full-hf-v64", whose forward peaks at the final norm]"""
    return eager - ctx.stream * spec.hidden if compiled_layer(spec, ctx) else eager


def compiled_mlp_parts(spec: ModelSpec, layer: LayerSpec, ctx: ActivationContext, eager: list[int]) -> list[int]:
    """Per token, what a compiled gated MLP saves, as mlp.mlp_saved_parts orders them (the
    inputs' Linears, gate's output, act(gate), up's output, down's saves): act(gate) is
    recomputed from gate's saved output in backward, so it is not saved. Plain and MoE MLPs
    stay eager."""
    if not compiled_layer(spec, ctx) or layer.experts or not is_gated(layer) or len(eager) != 5:
        return eager
    return [eager[0], eager[1], 0, *eager[3:]]


def compiled_chunked_loss(
    tokens: int, vocab: int, chunk_rows: int, logits: int, compute_bytes: int, tanh: int
) -> tuple[int, int]:
    """(forward, backward) bytes of torchtune's compiled chunked cross-entropy: `logits` is the
    bytes of the 8 chunks of logits (with a softcap's saved tanh output), `tanh` that output
    alone. Forward: the chunks and the per-row reductions; backward: the saved chunks, the
    softcap's saved output and one chunk's grad in the chunks' dtype."""
    forward = logits + SAVED_ROW_BYTES * tokens
    backward = tanh + compute_bytes * tokens * vocab + SAVED_ROW_BYTES * tokens + compute_bytes * chunk_rows * vocab
    return forward, backward


def compiled_linear_ce_loss(rows: int, vocab: int, last: int, compute_bytes: int, weight: int) -> tuple[int, int]:
    """(forward, backward) bytes of torchtune's LinearCrossEntropyLoss under compile_loss, which
    compiles compute_cross_entropy: one chunk's projection and cross-entropy in one graph
    (pytorch/torchtune@bd2a0fc torchtune/modules/loss/cross_entropy_loss.py:54-65, 87-115;
    training/_compile.py:56-75). Traced (cases torchtune-linear-ce-compile-*): each chunk's graph
    saves its own logits (compute dtype) and the two fp32 row reductions, as the compiled chunked
    loss does, so the 8 chunks' logits stay alive until backward; its backward writes the logits'
    grad over the saved logits (AOT autograd's donated buffers) and returns the output layer's
    weight grad as its own contiguous tensor, which the engine's input buffer sums in place: when
    the layer trains (`weight` its bytes), two of them at the second-last chunk's backward."""
    saved = compute_bytes * rows * vocab + SAVED_ROW_BYTES * rows
    backward = max(saved + weight, saved - compute_bytes * last * vocab + 2 * weight)
    return saved, backward


def chunked_compiled(setup: TrainingSetup) -> bool:
    """Whether the chunked loss runs compiled: under --compile (torchtune's compile_loss), and
    always on axolotl, whose patch compiles compute_cross_entropy whatever its torch_compile
    says (axolotl==0.19.0 axolotl/monkeypatch/loss/chunked.py:74-79 _build_chunked_ce_loss_fn:
    torch.compile(loss_fn_ce.compute_cross_entropy, backend="inductor"))."""
    return setup.loss == Loss.CHUNKED and (setup.compile or setup.stack == Stack.AXOLOTL)


def axolotl_chunked_loss(tokens: int, logits: int, tanh: int, batch_size: int) -> tuple[int, int]:
    """(forward, backward) bytes of axolotl's chunked cross-entropy (axolotl==0.19.0
    axolotl/monkeypatch/loss/chunked.py:93-96, 101-122, patched over transformers'
    ForCausalLMLoss by patch_chunked_ce_loss_fn, :127-134): the HF model makes the full logits
    (`logits`, the bf16 [N, V] tensor, `tanh` a softcap's saved output on top), the loss splits
    them with `source.chunk(8, dim=1)` and reshapes each chunk to rows (:60-62) before the
    compiled per-chunk cross-entropy, which saves its input (as torchtune's compiled loss).
    Traced (cases axolotl-chunked-* of tests/data/cpu/trace.jsonl): with batch > 1 a chunk of
    the sequence is not contiguous, so the reshape copies it: 8 copies, the logits again, saved
    while the logits die after forward; with batch 1 the chunks are views, the logits stay
    alive until the last chunk's backward. Backward: the 8 compiled backwards leave 8 chunk
    grads (the logits' bytes), then SplitBackward cats them into one [N, V] grad for lm_head:
    2 logits at its widest, either way; lm_head gets one grad (no summed chunk grads)."""
    copies = logits if batch_size > 1 else 0
    forward = tanh + logits + copies + SAVED_ROW_BYTES * tokens
    backward = tanh + 2 * logits
    return forward, backward


def compile_notes(setup: TrainingSetup) -> list[str]:
    """What --compile changes in this estimate and what it leaves eager; without it, on the
    torchtune stack with its chunked loss, that torchtune's own published figures are compiled."""
    if setup.loss == Loss.CHUNKED and setup.stack == Stack.AXOLOTL:
        notes = [
            "--loss chunked on axolotl: its patch chunks the model's full logits and always compiles the "
            "per-chunk cross-entropy (axolotl==0.19.0 monkeypatch/loss/chunked.py; CPU trace of axolotl's loss)"
        ]
        return notes + (_compiled_layers_note(setup) if setup.compile else [])
    if not setup.compile:
        if setup.stack == Stack.TORCHTUNE and setup.loss == Loss.CHUNKED:
            return [
                "torchtune's configs ship compile: False, estimated here; torchtune's README memory table "
                "was measured with torch.compile on: add --compile (compile: True) to compare with it"
            ]
        return []
    return _compiled_layers_note(setup)


def _compiled_layers_note(setup: TrainingSetup) -> list[str]:
    loss = (
        f"the {setup.loss.value} loss compiled as torchtune's compile_loss (CPU trace of torchtune's loss)"
        if setup.loss in (Loss.CHUNKED, Loss.TORCHTUNE_LINEAR_CE)
        else f"--loss {setup.loss.value} kept as run eagerly (only torchtune's two losses are modelled compiled)"
    )
    return [f"--compile: {loss}; {_layers_phrase(setup)}"]


def _layers_phrase(setup: TrainingSetup) -> str:
    if compiled_setup(activation_context(setup)):
        return (
            "each decoder layer's saves as compiled on a Llama-style RMSNorm model (CPU trace of inductor's "
            "partition: RMSNorms save their input and rstd, act(gate) is recomputed; other norms counted "
            "eager); its backward's working set counted as the eager layer's, an upper bound"
        )
    return (
        "the compiled decoder layers are counted as eager ones (modelled compiled only for a full "
        "fine-tune without checkpointing or offload), an upper bound on their saves "
        "(scripts/compile_layer_probe.py)"
    )
