"""The loss of the step as each library computes it (--loss, --fp32-outputs), for
Built.forward: verify on a GPU and the CPU trace run the real code, not a copy of it.

Each function takes the built step and the batch and returns (loss, output): the output
is what the training loop would hold (a ModelOutput, torchtune's logit chunks), kept only
under --keep-logits. memory/loss.py models each of them.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vramplan.errors import VramplanError
from vramplan.setup import Loss, Precision

IGNORE_INDEX = -100
# The losses trl==1.16.0's SFTTrainer asks its fused head for (sft_trainer.py:1144-1147)
TRL_OUTPUTS = ("log_probs", "entropy", "is_top1")


def _need(module: str, what: str):
    from vramplan.verify.optional import need

    return need(module, what)


def _parts(model):
    """The decoder stack and lm_head of a (peft-wrapped) causal LM; peft adapts them in place."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings(), base.config.get_text_config()


def _fp32_outputs(fn: Callable, built) -> Callable:
    """accelerate==1.16.0 accelerator.py:1791-1801: under mixed precision prepare_model wraps
    forward in convert_outputs_to_fp32 (utils/operations.py:872-893), whatever the loss."""
    if not built.setup.fp32_outputs:
        return fn
    return _need("accelerate.utils", "--fp32-outputs").convert_outputs_to_fp32(fn)


def hf_step(built, ids):
    """The model's own ForCausalLMLoss (transformers loss/loss_utils.py): labels = input_ids."""
    out = _fp32_outputs(built.model, built)(input_ids=ids, labels=ids, **built.inputs(ids))
    return out.loss, out


def torchtune_loss_class():
    """CEWithChunkedOutputLoss from the installed torchtune, loaded from its file: the
    package's __init__ imports torchao, torchdata and tiktoken, which the loss never uses
    (torchtune==0.6.1 torchtune/__init__.py, modules/loss/ce_chunked_output_loss.py)."""
    module = _module_file(
        "torchtune", "pip install torchtune==0.6.1 --no-deps", ("modules", "loss", "ce_chunked_output_loss.py")
    )
    return module.CEWithChunkedOutputLoss


def _module_file(package: str, pin: str, parts: tuple[str, ...], imports: dict[str, tuple[str, ...]] | None = None):
    """One module of an installed package, executed from its file without the package's
    __init__ (find_spec only locates the package); one line naming the package if absent.
    `imports`: the package's modules it imports (name -> file), each executed from its file the
    same way and put in sys.modules under that name only while the module runs."""
    import sys

    found = importlib.util.find_spec(package)
    root = Path(found.origin).parent if found is not None and found.origin is not None else None
    if root is None:
        raise VramplanError(f"needs the '{package}' package ({pin})", "--loss")
    if not root.joinpath(*parts).exists():
        raise VramplanError(f"the '{package}' found at {root} has no {'/'.join(parts)} ({pin})", "--loss")
    added = {name: _exec_file(name, root.joinpath(*where)) for name, where in (imports or {}).items()}
    added = {name: m for name, m in added.items() if sys.modules.setdefault(name, m) is m}
    try:
        return _exec_file(f"_vramplan_{package}_{parts[-1].removesuffix('.py')}", root.joinpath(*parts))
    finally:
        for name in added:
            del sys.modules[name]


def _exec_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile_loss(loss_fn) -> None:
    """torchtune==0.3.1 training/_compile.py:69-86 compile_loss (0.6.1 the same for this loss):
    only the upcast and cross-entropy of one chunk, compute_cross_entropy, is compiled."""
    import torch

    loss_fn.compute_cross_entropy = torch.compile(loss_fn.compute_cross_entropy, backend="inductor")


def torchtune_step(built, ids):
    """torchtune's decoder and recipe: the output layer on each of 8 chunks of the final
    hidden state (torchtune==0.6.1 modules/transformer.py TransformerDecoder.forward), labels
    shifted with an ignored last column, the chunks dropped before backward
    (recipes/lora_finetune_single_device.py _loss_step: `del logits`)."""
    import torch

    if built.loss_fn is None:
        built.loss_fn = torchtune_loss_class()()
        if built.setup.compile:
            _compile_loss(built.loss_fn)
    loss_fn = built.loss_fn
    decoder, head, config = _parts(built.model)
    cap = getattr(config, "final_logit_softcapping", None)

    def forward(ids):
        hidden = decoder(input_ids=ids, **built.inputs(ids)).last_hidden_state
        chunks = [head(c) for c in hidden.chunk(loss_fn.num_output_chunks, dim=1)]
        if cap:
            chunks = [torch.tanh(c / cap) * cap for c in chunks]
        ignore = torch.full((ids.shape[0], 1), IGNORE_INDEX, dtype=ids.dtype, device=ids.device)
        return loss_fn(chunks, torch.hstack((ids[..., 1:], ignore))), chunks

    return _fp32_outputs(forward, built)(ids)


# LinearCrossEntropyLoss is in no torchtune release (0.6.1 is the last): the repository at this
# commit, its source on PYTHONPATH (git archive of torchtune/)
TORCHTUNE_HEAD = "pytorch/torchtune@bd2a0fc"


def torchtune_linear_ce_class():
    """LinearCrossEntropyLoss from torchtune's source (pytorch/torchtune@bd2a0fc
    torchtune/modules/loss/cross_entropy_loss.py), executed from its file with the two torchtune
    modules it imports executed from theirs (modules/loss/loss_types.py for SFTLoss,
    utils/_logging.py for get_logger): the package's __init__ needs torchao."""
    module = _module_file(
        "torchtune",
        f"LinearCrossEntropyLoss is unreleased: the source of {TORCHTUNE_HEAD} on PYTHONPATH",
        ("modules", "loss", "cross_entropy_loss.py"),
        {
            "torchtune.modules.loss.loss_types": ("modules", "loss", "loss_types.py"),
            "torchtune.utils": ("utils", "_logging.py"),
        },
    )
    return module.LinearCrossEntropyLoss


def torchtune_linear_ce_step(built, ids):
    """torchtune's recipe with LinearCrossEntropyLoss (pytorch/torchtune@bd2a0fc
    recipes/lora_finetune_single_device.py:313-319, 584-602): set_model_output makes the decoder
    return its final norm's output (skip_output_layer, modules/transformer.py:678-689) and gives
    the loss the output layer (cross_entropy_loss.py:67-70); the loss keeps the rows whose label
    is not ignored, splits them into 8 chunks and projects and cross-entropies each in turn
    (:147-188); compile_loss compiles compute_cross_entropy, projection and CE of one chunk
    (training/_compile.py:56-75, cross_entropy_loss.py:54-65). Labels shifted with an ignored
    last column (datasets/_sft.py:165-175); the hidden state dropped after the loss (`del outputs`)."""
    import types

    import torch

    decoder, head, _ = _parts(built.model)
    if built.loss_fn is None:
        built.loss_fn = torchtune_linear_ce_class()()
        built.loss_fn.set_model_output(types.SimpleNamespace(output=head))
        if built.setup.compile:
            built.loss_fn.apply_compile_strategy(backend="inductor")
    hidden = decoder(input_ids=ids, **built.inputs(ids)).last_hidden_state
    ignore = torch.full((ids.shape[0], 1), IGNORE_INDEX, dtype=ids.dtype, device=ids.device)
    return built.loss_fn(hidden, torch.hstack((ids[..., 1:], ignore))), None


def axolotl_chunked_module():
    """axolotl's chunked cross-entropy patch, loaded from its file: the package's __init__
    pulls in axolotl's whole dependency set, the patch only torch (axolotl==0.19.0
    axolotl/monkeypatch/loss/chunked.py). find_spec only locates the package: an installed
    axolotl, or its source on PYTHONPATH."""
    return _module_file("axolotl", "pip install axolotl==0.19.0 --no-deps", ("monkeypatch", "loss", "chunked.py"))


def axolotl_chunked_step(built, ids):
    """axolotl's `chunked_cross_entropy: true` (loaders/patch_manager.py:408-415):
    patch_chunked_ce_loss_fn(8) puts get_causal_lm_loss(8)'s function in transformers'
    LOSS_MAPPING["ForCausalLM"] (chunked.py:127-134), which the model's loss_function reads;
    here the same function is set on the model alone, so no other step sees it. The model
    makes the full logits; the loss chunks them (views) and runs a torch.compile'd
    compute_cross_entropy per chunk (chunked.py:74-79, whatever axolotl's torch_compile)."""
    if built.loss_fn is None:
        built.loss_fn = axolotl_chunked_module().get_causal_lm_loss(8, IGNORE_INDEX)
    base = built.model.get_base_model() if hasattr(built.model, "get_base_model") else built.model
    base.loss_function = built.loss_fn
    out = _fp32_outputs(built.model, built)(input_ids=ids, labels=ids, **built.inputs(ids))
    return out.loss, out


def loss_step(setup) -> Callable:
    """The step's loss as its stack runs it: --loss chunked is axolotl's patch on axolotl;
    --objective dpo is TRL's DPOTrainer."""
    from vramplan.setup import Objective, Stack

    if setup.objective == Objective.DPO:
        return {Stack.AXOLOTL: axolotl_dpo_step, Stack.LLAMAFACTORY: llamafactory_dpo_step}.get(setup.stack, dpo_step)
    if setup.objective == Objective.GRPO:
        return grpo_step
    if setup.objective == Objective.KTO:
        return llamafactory_kto_step if setup.stack == Stack.LLAMAFACTORY else kto_step
    if setup.objective == Objective.ORPO:
        return axolotl_orpo_step
    if setup.objective == Objective.REWARD:
        return llamafactory_reward_step if setup.stack == Stack.LLAMAFACTORY else reward_step
    if setup.loss == Loss.CHUNKED and setup.stack == Stack.AXOLOTL:
        return axolotl_chunked_step
    return LOSS_STEPS[setup.loss]


def add_trl_head(model, outputs: tuple[str, ...] = TRL_OUTPUTS) -> None:
    """trl==1.16.0 SFTTrainer.__init__ (sft_trainer.py:1144-1147) patches every model with its
    fused, chunked LM head before wrapping it with peft; DPOTrainer asks it for DPO_OUTPUTS
    (dpo_trainer.py:943-947), and its reference copy for log_probs alone (add_fused_lm_head's
    default, :948-949)."""
    _need("trl.trainer.utils", "--loss trl-chunked-nll").add_fused_lm_head(model, outputs=outputs)


def dpo_step(built, ids):
    """trl==1.16.0 DPOTrainer._compute_loss (dpo_trainer.py:1285-1332, the sigmoid loss :1386):
    the policy's fused-head forward over the chosen and rejected rows, then under no_grad the
    reference's (peft: the same model with its adapters disabled, `use_adapter(model, None)`;
    a full fine-tune: the frozen copy), then the loss over the per-sequence log-prob sums. The
    labels are the input ids (every position a completion token: preference.py). TRL turns
    checkpointing off around the reference forward (disable_gradient_checkpointing), which
    under no_grad saves nothing either way; it is left on here."""
    import contextlib

    import torch
    import torch.nn.functional as F

    model = built.model
    kw = dict(input_ids=ids, labels=ids, fused_lm_head=True, use_cache=False, **built.inputs(ids))
    out = model(**kw)  # autocast and fp32 outputs on the forward (build.prepare_like_accelerate)
    logps = out.log_probs.sum(dim=1)
    if built.setup.precompute_ref_log_probs:  # the batch carries them (dpo_trainer.py:1311-1312)
        ref_logps = torch.zeros_like(logps)
    else:
        reference = built.ref_model if built.ref_model is not None else model
        adapters_off = model.disable_adapter() if built.ref_model is None else contextlib.nullcontext()
        with torch.no_grad(), adapters_off:
            ref_logps = reference(**kw).log_probs.sum(dim=1)
    chosen, rejected = logps.chunk(2, dim=0)
    ref_chosen, ref_rejected = ref_logps.chunk(2, dim=0)
    delta = (chosen - ref_chosen) - (rejected - ref_rejected)
    return -F.logsigmoid(DPO_BETA * delta).mean(), out


def _need_axolotl_trl(step: str) -> None:
    """axolotl==0.19.0's RL trainers run trl==1.9.0 (its pin): the installed trl must be that one,
    or VRAMPLAN_TRL19 names a folder holding it, put first on the path while trl is not imported
    yet (the GPU machine's batch installs TRL 1.16 for the other cases: scripts/device_batch.sh)."""
    import os
    import sys

    alt = os.environ.get("VRAMPLAN_TRL19")
    if alt and "trl" not in sys.modules and alt not in sys.path:
        sys.path.insert(0, alt)
    trl = _need("trl", f"--stack axolotl --objective {step.lower()}")
    if trl.__version__ != "1.9.0":
        raise VramplanError(
            f"axolotl's {step} step runs trl==1.9.0 (axolotl 0.19.0's pin), not trl {trl.__version__}: "
            "put trl 1.9.0's wheel first on PYTHONPATH",
            "--stack",
        )


def axolotl_orpo_step(built, ids):
    """axolotl==0.19.0 `rl: orpo` / `rl: simpo`: trl==1.9.0's experimental ORPOTrainer (with the NLL
    over the chosen rows) or CPOTrainer (loss_type simpo; cpo_alpha 0 without it) and its own
    get_batch_loss_metrics, on a stand-in trainer: the collator's chosen_* and rejected_* rows (the
    batch's first and second halves), concatenated, padded and run as they are
    (experimental/orpo/orpo_trainer.py:609-900, experimental/cpo/cpo_trainer.py:790-920)."""
    import types

    import torch

    _need_axolotl_trl("ORPO")
    setup = built.setup
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    Trainer: Any = ORPOTrainer if setup.chosen_nll else CPOTrainer
    trainer = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(device=ids.device, gather_for_metrics=lambda x: x),
        aux_loss_enabled=False,
        aux_loss_coef=0.0,
        is_encoder_decoder=False,
        padding_value=0,
        pad_token_id=0,
        beta=DPO_BETA,
        cpo_alpha=0.0,
        loss_type="simpo",
        simpo_gamma=0.5,
        label_smoothing=0.0,
        alpha=0.0,  # CPOConfig's AlphaPO exponent: 0 is SimPO
        concatenated_inputs=Trainer.concatenated_inputs,
        get_batch_logps=Trainer.get_batch_logps,
    )
    for name in ("concatenated_forward", "odds_ratio_loss" if setup.chosen_nll else "cpo_loss"):
        setattr(trainer, name, types.MethodType(getattr(Trainer, name), trainer))
    half, ones = ids.shape[0] // 2, torch.ones_like(ids)
    batch = {}
    for side, rows in (("chosen", slice(0, half)), ("rejected", slice(half, None))):
        batch.update(
            {f"{side}_input_ids": ids[rows], f"{side}_attention_mask": ones[rows], f"{side}_labels": ids[rows].clone()}
        )
    stand_in: Any = trainer
    loss, _metrics = Trainer.get_batch_loss_metrics(stand_in, built.model, batch)
    return loss, None


def axolotl_dpo_step(built, ids):
    """axolotl==0.19.0 `rl: dpo`: AxolotlDPOTrainer (core/trainers/dpo/trainer.py:26-102) runs
    trl==1.9.0's DPOTrainer._compute_loss unchanged (its pin), called here as it is, on a
    stand-in for the trainer that holds what the method reads (the model, the reference copy
    or None, the defaults of DPOConfig). Each row's prompt is empty: every position a
    completion token (preference.py). accelerate's output conversion is on the model's
    forward as prepare_model puts it (build.wrap_fp32_outputs)."""
    import types
    from collections import defaultdict

    import torch

    _need_axolotl_trl("DPO")
    from trl.trainer.dpo_trainer import DPOTrainer

    setup = built.setup
    trainer = types.SimpleNamespace(
        model=built.model,
        ref_model=built.ref_model,
        accelerator=types.SimpleNamespace(
            device=ids.device, unwrap_model=lambda m: m, gather_for_metrics=lambda x: x, gather=lambda x: x
        ),
        args=types.SimpleNamespace(gradient_checkpointing_kwargs={"use_reentrant": setup.checkpoint_reentrant}),
        aux_loss_enabled=False,
        router_aux_loss_coef=0.0,
        ld_alpha=None,
        precompute_ref_logps=setup.precompute_ref_log_probs,
        f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=0.5,
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        beta=DPO_BETA,
        label_smoothing=0.0,
        use_weighting=setup.dpo_use_weighting,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
    )
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.ones_like(ids)}
    if setup.precompute_ref_log_probs:
        half = ids.shape[0] // 2
        zeros = torch.zeros(half, device=ids.device)
        inputs.update(ref_chosen_logps=zeros, ref_rejected_logps=zeros.clone())
    stand_in: Any = trainer
    return DPOTrainer._compute_loss(stand_in, built.model, inputs, return_outputs=False), None


def kto_step(built, ids):
    """trl==1.16.0 KTOTrainer._compute_loss (kto_trainer.py:1370-1560), or axolotl's trl==1.9.0 one
    (kto_trainer.py:1478-1660, the model's logits; its wheel first on the path), its own code, on a stand-in
    trainer holding what it reads (KTOConfig's defaults: loss_type kto or apo_zero_unpaired, beta
    0.1, weights 1.0): the collator's batch (:304-420) with every position a completion token,
    rows labelled desirable and undesirable in turn, and under the KL term each prompt paired with
    the next row's completion (its ids rolled by one row). The policy's fused head and, for a full
    fine-tune, the frozen copy's are patched as KTOTrainer patches them (build.build_step)."""
    import types
    from collections import defaultdict

    import torch

    from vramplan.setup import Stack

    if built.setup.stack == Stack.AXOLOTL:  # AxolotlKTOTrainer is trl 1.9.0's (core/trainers/trl.py:28-40)
        _need_axolotl_trl("KTO")
    else:
        _need("trl", "--objective kto")
    from trl.trainer.kto_trainer import KTOTrainer

    setup = built.setup
    trainer = types.SimpleNamespace(
        model=built.model,
        ref_model=built.ref_model,
        accelerator=types.SimpleNamespace(device=ids.device, unwrap_model=lambda m: m, gather_for_metrics=lambda x: x),
        args=types.SimpleNamespace(gradient_checkpointing_kwargs={"use_reentrant": setup.checkpoint_reentrant}),
        aux_loss_enabled=False,
        router_aux_loss_coef=0.0,
        calculate_KL=setup.kto_kl,
        precompute_ref_logps=setup.precompute_ref_log_probs,
        loss_type="kto" if setup.kto_kl else "apo_zero_unpaired",
        beta=DPO_BETA,
        desirable_weight=1.0,
        undesirable_weight=1.0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        use_liger_kernel=False,  # trl 1.9.0's KL forward reads these two
        _is_vlm=False,
    )
    trainer._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, trainer)
    ones = torch.ones_like(ids)
    batch = {
        "input_ids": ids,
        "attention_mask": ones,
        "completion_mask": ones.clone(),
        "label": torch.arange(ids.shape[0], device=ids.device) % 2 == 0,
    }
    if setup.kto_kl:
        batch.update(KL_input_ids=ids.roll(1, dims=0), KL_attention_mask=ones.clone(), KL_completion_mask=ones.clone())
    if setup.precompute_ref_log_probs:
        batch["ref_logps"] = torch.zeros(ids.shape[0], device=ids.device)
        if setup.kto_kl:
            batch["ref_KL_logps"] = torch.zeros(ids.shape[0], device=ids.device)
    stand_in: Any = trainer
    return KTOTrainer._compute_loss(stand_in, built.model, batch, return_outputs=False), None


# LLaMA-Factory 0.9.5's stage rm and the value head of the trl it pins (trl<=0.24.0), read from source
LF_RM_SOURCES = ((("train", "rm", "trainer.py"), "PairwiseTrainer.compute_loss"),)
VALUE_HEAD_FILE = ("models", "modeling_value_head.py")


def _exec_from_source(path: Path, names: tuple[str, ...], namespace: dict) -> dict:
    """Each named function (or class.method, or a whole class) of a source file, executed into
    `namespace` from the file's own text."""
    import ast

    tree = ast.parse(path.read_text())
    for name in names:
        cls, _, func = name.rpartition(".")
        node: ast.stmt
        if not func[0].islower():  # a class: the whole definition
            node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == func)
        else:
            body = (
                next(n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls) if cls else tree.body
            )
            node = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == func)
        exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def _value_head_source() -> Path:
    """trl<=0.24.0's modeling_value_head.py (LLaMA-Factory's pin; trl 1.x has none): from the
    installed trl when it has one, else the file VRAMPLAN_TRL_VALUE_HEAD names."""
    import os

    found = importlib.util.find_spec("trl")
    if found is not None and found.origin is not None:
        path = Path(found.origin).parent.joinpath(*VALUE_HEAD_FILE)
        if path.exists():
            return path
    env = os.environ.get("VRAMPLAN_TRL_VALUE_HEAD")
    if env and Path(env).exists():
        return Path(env)
    raise VramplanError(
        "needs trl 0.24's models/modeling_value_head.py, LLaMA-Factory's pin (set VRAMPLAN_TRL_VALUE_HEAD to it)",
        "--stack",
    )


@functools.cache
def llamafactory_reward_functions() -> dict:
    """PairwiseTrainer.compute_loss (llamafactory==0.9.5 train/rm/trainer.py:88-110) and trl 0.24's
    ValueHead and AutoModelForCausalLMWithValueHead.forward (models/modeling_value_head.py:22-184),
    executed from their source files (read once per process)."""
    import typing

    import torch
    from torch import nn

    found = importlib.util.find_spec("llamafactory")
    if found is None or found.origin is None:
        raise VramplanError("needs llamafactory==0.9.5's source (pip install llamafactory==0.9.5 --no-deps)", "--stack")
    namespace: dict = {
        "torch": torch,
        "nn": nn,
        "override": lambda f: f,
        **{name: getattr(typing, name) for name in ("Optional", "Union", "TYPE_CHECKING")},
    }
    for parts, name in LF_RM_SOURCES:
        _exec_from_source(Path(found.origin).parent.joinpath(*parts), (name,), namespace)
    return _exec_from_source(
        _value_head_source(), ("ValueHead", "AutoModelForCausalLMWithValueHead.forward"), namespace
    )


def llamafactory_reward_step(built, ids):
    """llamafactory==0.9.5 `stage: rm`: PairwiseTrainer.compute_loss as it is, on the value-head
    wrapper, with the pairwise collator's labels (the causal LM computes its LM loss, then dropped)."""
    import types

    import torch

    model = built.value_head_model  # build.value_head_wrapper
    trainer = types.SimpleNamespace(finetuning_args=types.SimpleNamespace())
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    return llamafactory_reward_functions()["compute_loss"](trainer, model, batch), None


# LLaMA-Factory 0.9.5's DPO pieces, read from its source files: (file, function or class.method)
LF_DPO_SOURCES = (
    (("train", "trainer_utils.py"), "get_batch_logps"),
    (("train", "trainer_utils.py"), "nested_detach"),
    (("train", "dpo", "trainer.py"), "CustomDPOTrainer.concatenated_forward"),
    (("train", "dpo", "trainer.py"), "CustomDPOTrainer.compute_reference_log_probs"),
    (("train", "dpo", "trainer.py"), "CustomDPOTrainer.compute_preference_loss"),
    (("train", "dpo", "trainer.py"), "CustomDPOTrainer.simpo_loss"),
    (("train", "dpo", "trainer.py"), "CustomDPOTrainer.get_batch_loss_metrics"),
)


@functools.cache
def llamafactory_functions(sources: tuple) -> dict:
    """LLaMA-Factory's DPO or KTO step functions, executed from its own source (llamafactory==0.9.5; the
    package's __init__ imports its whole dependency set and pins transformers<=5.6.0, the
    functions only torch): found with find_spec on an installed llamafactory or its source on
    PYTHONPATH, each function's text taken from the file by its name; read once per process, not
    per step."""
    import contextlib
    import typing
    from collections.abc import Mapping

    import torch
    import torch.nn.functional as F

    found = importlib.util.find_spec("llamafactory")
    if found is None or found.origin is None:
        raise VramplanError("needs llamafactory==0.9.5's source (pip install llamafactory==0.9.5 --no-deps)", "--stack")
    root = Path(found.origin).parent
    namespace: dict = {
        "torch": torch,
        "F": F,
        "IGNORE_INDEX": IGNORE_INDEX,
        "nullcontext": contextlib.nullcontext,
        "Mapping": Mapping,
        "override": lambda f: f,
        **{name: getattr(typing, name) for name in ("Optional", "Union", "Literal", "TYPE_CHECKING")},
    }
    for parts, name in sources:
        _exec_from_source(root.joinpath(*parts), (name,), namespace)
    return namespace


def llamafactory_dpo_step(built, ids):
    """llamafactory==0.9.5 `stage: dpo`: CustomDPOTrainer.get_batch_loss_metrics (train/dpo/
    trainer.py:276-317) as it is, on a stand-in for the trainer: concatenated_forward (the
    model's logits `.to(torch.float32)`, get_batch_logps' log-softmax over every row, the logits
    returned and held to the metrics), then compute_reference_log_probs (the same under no_grad,
    adapters disabled or the frozen copy). The sigmoid loss on [B] tensors stands in for trl
    0.24's dpo_loss, which LLaMA-Factory calls (memory-neutral)."""
    import types

    import torch
    import torch.nn.functional as F

    lf = llamafactory_functions(LF_DPO_SOURCES)

    def dpo_loss(pc, pr, rc, rr):
        logits = (pc - pr) - (rc - rr)
        return -F.logsigmoid(DPO_BETA * logits), DPO_BETA * (pc - rc).detach(), DPO_BETA * (pr - rr).detach()

    trainer = types.SimpleNamespace(
        finetuning_args=types.SimpleNamespace(use_ref_model=not built.setup.precompute_ref_log_probs),
        ref_model=built.ref_model,
        accelerator=types.SimpleNamespace(device=ids.device, unwrap_model=lambda m: m),
        # pref_loss simpo has no reference (finetuning_args.py:574): the precomputed case's stand-in
        loss_type="simpo" if built.setup.precompute_ref_log_probs else "sigmoid",
        simpo_gamma=0.5,
        beta=DPO_BETA,
        ld_alpha=None,
        ftx_gamma=0.0,
        bco_gemma=0.0,
        dpo_loss=dpo_loss,
    )
    for name in ("concatenated_forward", "compute_reference_log_probs", "compute_preference_loss", "simpo_loss"):
        setattr(trainer, name, types.MethodType(lf[name], trainer))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss, _metrics = lf["get_batch_loss_metrics"](trainer, built.model, batch)
    return loss, None


# LLaMA-Factory 0.9.5's KTO pieces, read from its source files
LF_KTO_SOURCES = (
    (("train", "trainer_utils.py"), "get_batch_logps"),
    (("train", "trainer_utils.py"), "nested_detach"),
    (("train", "kto", "trainer.py"), "CustomKTOTrainer.forward"),
    (("train", "kto", "trainer.py"), "CustomKTOTrainer.concatenated_forward"),
    (("train", "kto", "trainer.py"), "CustomKTOTrainer.compute_reference_log_probs"),
    (("train", "kto", "trainer.py"), "CustomKTOTrainer.get_batch_loss_metrics"),
)


def llamafactory_kto_step(built, ids):
    """llamafactory==0.9.5 `stage: kto`: CustomKTOTrainer.get_batch_loss_metrics (train/kto/trainer.py:
    221-269) as it is, on a stand-in: concatenated_forward (the policy's fp32 logits and
    get_batch_logps, the KL rows under no_grad, the rows indexed by kto_tags), then
    compute_reference_log_probs (adapters disabled or the frozen copy). The KL rows are the batch's
    ids rolled by one row (data/processor/feedback.py pairs each prompt with another response);
    trl 0.24's kto_loss, which it calls, stands in as a sigmoid over [B] tensors (memory-neutral)."""
    import types

    import torch
    import torch.nn.functional as F

    lf = llamafactory_functions(LF_KTO_SOURCES)

    def kto_loss(pc, pr, pkl, rc, rr, rkl):
        kl = (pkl - rkl).mean().clamp(min=0).detach()
        losses = torch.cat((1 - F.sigmoid(DPO_BETA * (pc - rc - kl)), 1 - F.sigmoid(DPO_BETA * (kl - pr + rr))), 0)
        return losses, DPO_BETA * (pc - rc).detach(), DPO_BETA * (pr - rr).detach(), kl

    trainer = types.SimpleNamespace(
        ref_model=built.ref_model,
        accelerator=types.SimpleNamespace(device=ids.device, unwrap_model=lambda m: m),
        ftx_gamma=0.0,
        kto_loss=kto_loss,
    )
    for name in ("forward", "concatenated_forward", "compute_reference_log_probs"):
        setattr(trainer, name, types.MethodType(lf[name], trainer))
    ones, kl = torch.ones_like(ids), ids.roll(1, dims=0)
    batch = {"input_ids": ids, "attention_mask": ones, "labels": ids, "kl_input_ids": kl}
    batch.update(kl_attention_mask=ones.clone(), kl_labels=kl.clone())
    batch["kto_tags"] = torch.arange(ids.shape[0], device=ids.device) % 2 == 0
    loss, _metrics = lf["get_batch_loss_metrics"](trainer, built.model, batch)
    return loss, None


# DPOConfig.beta's default (trl==1.16.0 dpo_config.py); its value changes no memory
DPO_BETA = 0.1
# What DPOTrainer asks the policy's fused head for (dpo_trainer.py:943-947)
DPO_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
# What KTOTrainer asks the policy's fused head for (trl==1.16.0 kto_trainer.py:966-970)
KTO_OUTPUTS = ("log_probs", "entropy", "mean_logits")


# What GRPOTrainer asks the policy's fused head for (trl==1.16.0 grpo_trainer.py:1068-1073)
GRPO_OUTPUTS = ("log_probs", "entropy")


def _grpo_stand_in(built, device):
    """A stand-in for GRPOTrainer holding what _get_per_token_logps_and_entropies and _compute_loss
    read, at GRPOConfig's defaults (trl==1.16.0 grpo_config.py: loss_type "dapo", epsilon 0.2,
    token-level importance sampling, no entropy masking or bonus) and the setup's beta; one process."""
    import contextlib
    import types
    from collections import defaultdict

    import torch

    setup = built.setup
    half = torch.float16 if setup.precision == Precision.FP16 else torch.bfloat16  # build.half_dtype's rule
    autocast = (
        (lambda: torch.autocast(torch.device(device).type, dtype=half)) if setup.autocast else contextlib.nullcontext
    )
    accelerator = types.SimpleNamespace(
        autocast=autocast,
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        reduce=lambda x, reduction="sum": x,
        num_processes=1,
        is_main_process=True,
        sync_gradients=True,
        device=device,
        unwrap_model=lambda m: m,
    )
    return types.SimpleNamespace(
        model=built.model,
        accelerator=accelerator,
        args=types.SimpleNamespace(
            use_bias_correction_kl=False, delta=None, steps_per_generation=setup.steps_per_generation or 1
        ),
        aux_loss_enabled=False,
        router_aux_loss_coef=0.0,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        loss_type="dapo",
        epsilon_low=0.2,
        epsilon_high=0.2,
        beta=setup.beta,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        current_gradient_accumulation_steps=setup.gradient_accumulation,
        max_completion_length=setup.completion_len,
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        # what trl==1.9.0's full-logits _get_per_token_logps_and_entropies and _compute_loss read
        # besides (grpo_trainer.py:1435-1541, 2991-3200): temperature 1.0, no entropy bonus
        temperature=1.0,
        model_kwarg_keys=_forward_keys(built.model),
        entropy_coef=0.0,
        use_adaptive_entropy=False,
        _last_world_entropy=float("inf"),
    )


def _forward_keys(model):
    """GRPOTrainer.model_kwarg_keys (trl==1.9.0 grpo_trainer.py:362): the base model's forward's
    parameters (logits_to_keep among them for a causal LM)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inspect.signature(base.forward).parameters.keys()


def _grpo_generate(built, prompts, new_tokens: int):
    """GRPOTrainer._generate_single_turn without vLLM (grpo_trainer.py:1811-1866): the model
    unwrapped with checkpointing off (trl/models/utils.py _unwrap_model_for_generation), then
    model.generate under no_grad with the GenerationConfig TRL builds (:1155-1173: sampling at
    temperature 1.0, top_p 1.0, top_k 0). No end-of-sequence token: every completion runs to its
    full length, as the model counts it."""
    import torch
    from transformers import GenerationConfig

    model = built.model
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=True,
        pad_token_id=0,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        repetition_penalty=1.0,
        disable_compile=True,
    )
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.generation_config.eos_token_id = None
    # a checkpoint's config.json has use_cache true; verify's builder turns it off for the reference step
    base.config.use_cache = base.generation_config.use_cache = True
    checkpointing = base.is_gradient_checkpointing
    if checkpointing:
        base.gradient_checkpointing_disable()
    with torch.no_grad():
        out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), generation_config=config)
    if checkpointing:
        base.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": built.setup.checkpoint_reentrant}
        )
    return out[:, prompts.shape[1] :]


def grpo_step(built, ids):
    """trl==1.16.0 GRPOTrainer: the generation batch (rows x steps_per_generation prompts, the
    batch's first prompt_len tokens) completed by model.generate (_grpo_generate), the no-grad
    scoring its own _get_per_token_logps_and_entropies runs (the old policy's when generation is
    misaligned, the reference's when beta > 0: adapters disabled or the copy), then its own
    _compute_loss on the first micro-batch's views (split_tensor_dict), on a stand-in trainer."""
    import contextlib
    import types

    import torch

    from vramplan.setup import Stack

    if built.setup.stack == Stack.AXOLOTL:  # AxolotlGRPOTrainer is trl 1.9.0's (core/trainers/grpo/trainer.py:57-67)
        _need_axolotl_trl("GRPO")
    else:
        _need("trl", "--objective grpo")
    from trl.trainer.grpo_trainer import GRPOTrainer

    from vramplan.memory.grpo import scores_old, scores_reference

    setup, model = built.setup, built.model
    trainer: Any = _grpo_stand_in(built, ids.device)
    trainer._get_per_token_logps_and_entropies = types.MethodType(
        GRPOTrainer._get_per_token_logps_and_entropies, trainer
    )
    rows, c = ids.shape[0], setup.completion_len
    g = setup.generation_rows
    prompts = ids[:, : ids.shape[1] - c].repeat(-(-g // rows), 1)[:g].contiguous()
    completions = _grpo_generate(built, prompts, c)
    batch = {
        "prompt_ids": prompts,
        "prompt_mask": torch.ones_like(prompts),
        "completion_ids": completions,
        "completion_mask": torch.ones_like(completions),
    }
    scored = torch.cat([prompts, completions], dim=1), torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        if scores_old(setup):
            batch["old_per_token_logps"] = GRPOTrainer._get_per_token_logps_and_entropies(
                trainer, model, *scored, c, batch_size=rows
            )[0]
        if scores_reference(setup):
            reference = built.ref_model if built.ref_model is not None else model
            off = model.disable_adapter() if built.ref_model is None else contextlib.nullcontext()
            with off:
                batch["ref_per_token_logps"] = GRPOTrainer._get_per_token_logps_and_entropies(
                    trainer, reference, *scored, c, batch_size=rows
                )[0]
    del scored
    batch["advantages"] = torch.randn(g, device=ids.device)
    micro = {k: v[:rows] for k, v in batch.items()}
    micro["num_items_in_batch"] = torch.tensor(float(rows * c), device=ids.device)
    return GRPOTrainer._compute_loss(trainer, model, micro), None


def reward_step(built, ids):
    """trl==1.16.0 RewardTrainer.compute_loss (reward_trainer.py:778-817), its own code, on a
    stand-in trainer: the collator's input_ids and attention_mask over chosen then rejected rows
    (:203-229), the model's pooled scores split in two, -logsigmoid of their difference."""
    import types
    from collections import defaultdict

    import torch

    _need("trl", "--objective reward")
    from trl.trainer.reward_trainer import RewardTrainer

    accelerator = types.SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer: Any = types.SimpleNamespace(
        model=built.model,
        accelerator=accelerator,
        args=types.SimpleNamespace(center_rewards_coefficient=None),
        _total_train_tokens=0,
        _tp_size=1,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return RewardTrainer.compute_loss(trainer, built.model, inputs), None


def trl_step(built, ids):
    """compute_loss: `model(**inputs, fused_lm_head=True)` (sft_trainer.py:1611)."""
    out = _fp32_outputs(built.model, built)(input_ids=ids, labels=ids, fused_lm_head=True, **built.inputs(ids))
    return out.loss, out


def liger_step(built, ids):
    """Liger's causal-LM loss (liger-kernel==0.8.5 transformers/model/loss_utils.py:67-106):
    every row of the final hidden state, labels shifted by padding."""
    import torch.nn.functional as F

    fn = _need("liger_kernel.transformers.functional", "--loss liger").liger_fused_linear_cross_entropy
    decoder, head, _ = _parts(built.model)
    hidden = decoder(input_ids=ids, **built.inputs(ids)).last_hidden_state
    labels = F.pad(ids, (0, 1), value=IGNORE_INDEX)[..., 1:]
    return fn(hidden.reshape(-1, hidden.shape[-1]), head.weight, labels.reshape(-1)), None


def cce_step(built, ids):
    """Cut Cross-Entropy on the final hidden state and lm_head's weight, shifted inside
    (cut_cross_entropy linear_cross_entropy(..., shift=True), as axolotl's patch calls it)."""
    lce = _need("cut_cross_entropy", "--loss cce").linear_cross_entropy
    decoder, head, _ = _parts(built.model)
    return lce(decoder(input_ids=ids, **built.inputs(ids)).last_hidden_state, head.weight, ids, shift=True), None


def unsloth_step(built, ids):
    """unsloth_zoo==2026.10.9 fused_losses/cross_entropy_loss.py:809 unsloth_fused_ce_loss, as
    unsloth's patched CausalLM forward calls it (unsloth/models/llama.py:2086-2140)."""
    fused = _need("unsloth_zoo.fused_losses.cross_entropy_loss", "--loss unsloth").unsloth_fused_ce_loss
    decoder, head, _ = _parts(built.model)
    hidden = decoder(input_ids=ids, **built.inputs(ids)).last_hidden_state
    return fused(None, hidden, head.weight, head.bias, ids), None


LOSS_STEPS: dict[Loss, Callable] = {
    Loss.HF: hf_step,
    Loss.CHUNKED: torchtune_step,
    Loss.TORCHTUNE_LINEAR_CE: torchtune_linear_ce_step,
    Loss.TRL_CHUNKED_NLL: trl_step,
    Loss.LIGER: liger_step,
    Loss.CCE: cce_step,
    Loss.UNSLOTH: unsloth_step,
}


def check_device(loss: Loss, device: str) -> None:
    from vramplan.memory.loss import CUDA_ONLY

    if loss in CUDA_ONLY and not device.startswith("cuda"):
        raise VramplanError(f"{loss.value} runs Triton kernels ({CUDA_ONLY[loss]}): it needs --device cuda", "--loss")
