"""Bytes per memory category, counted from the live tensors (works on any device).

Each storage is counted once (tied weights, shared quantization codes, views that keep a
whole SVD factor alive), at its full storage size, because that is what the allocator holds.
"""

from __future__ import annotations

from vramplan.categories import Category as C


class Counter:
    def __init__(self, device_type: str):
        self.device_type = device_type
        self.seen: set[tuple] = set()

    def add(self, t) -> int:
        """Bytes of `t`'s storage if it lives on the measured device and was not counted yet."""
        import torch

        if t is None or not isinstance(t, torch.Tensor):
            return 0
        if hasattr(t, "to_local"):  # DTensor: this rank's shard
            t = t.to_local()
        if t.device.type != self.device_type or t.is_meta:
            return 0
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
            return t.numel() * t.element_size()
        key = (str(t.device), st.data_ptr())
        if key in self.seen or st.data_ptr() == 0:
            return 0
        self.seen.add(key)
        return int(st.nbytes())


def _tensors_of(obj, depth: int = 2):
    """Tensors held by an optimizer-state value or a quant-state object (a few levels deep)."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth > 0 and isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_of(v, depth - 1)
    elif depth > 0 and isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_of(v, depth - 1)
    elif depth > 0 and hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module):
        for v in vars(obj).values():
            yield from _tensors_of(v, depth - 1)


def model_bytes(model, device_type: str) -> dict[C, int]:
    """Weights, quantization state (4-bit, LLM.int8's row scales) and LoRA adapters held by the model."""
    cnt = Counter(device_type)
    out = {C.WEIGHTS: 0, C.QUANT_STATE: 0, C.ADAPTERS: 0}
    for name, p in model.named_parameters():
        cat = C.ADAPTERS if "lora_" in name else C.WEIGHTS
        out[cat] += cnt.add(p)
        qs = getattr(p, "quant_state", None)  # bitsandbytes Params4bit
        if qs is not None:
            out[C.QUANT_STATE] += sum(cnt.add(t) for t in _tensors_of(qs))
        scb = getattr(p, "SCB", None)  # bitsandbytes Int8Params' row scales, before the first forward
        if scb is not None and hasattr(scb, "untyped_storage"):
            out[C.QUANT_STATE] += cnt.add(scb)
    for mod in model.modules():
        # Linear8bitLt.init_8bit_state moves CB (the weight itself) and SCB to its MatmulLtState
        scb = getattr(getattr(mod, "state", None), "SCB", None)
        if scb is not None and hasattr(scb, "untyped_storage"):
            out[C.QUANT_STATE] += cnt.add(scb)
        meta = getattr(mod, "meta", None)  # hqq HQQLinear keeps scales/zeros in a dict
        if isinstance(meta, dict):
            out[C.QUANT_STATE] += sum(cnt.add(t) for t in _tensors_of(meta))
        qs = getattr(mod, "quant_state", None)
        if qs is not None and not hasattr(qs, "numel"):
            out[C.QUANT_STATE] += sum(cnt.add(t) for t in _tensors_of(qs))
    for _name, b in model.named_buffers():
        out[C.WEIGHTS] += cnt.add(b)
    return out


def gradient_bytes(model, device_type: str) -> int:
    cnt = Counter(device_type)
    return sum(cnt.add(p.grad) for p in model.parameters() if p.grad is not None)


def optimizer_bytes(optimizers, device_type: str) -> int:
    """Adam moments, 8-bit states and their absmax/qmaps, GaLore projectors."""
    cnt = Counter(device_type)
    total = 0
    for opt in optimizers:
        for state in opt.state.values():
            total += sum(cnt.add(t) for t in _tensors_of(state, depth=3))
    return total


def param_counts(model) -> tuple[int, int]:
    """(total, trainable) parameter counts; 4-bit weights count their logical elements."""
    total = trainable = 0
    for p in model.parameters():
        n = p.numel()
        if hasattr(p, "to_local"):
            n = p.numel()  # DTensor numel is the global size
        qs = getattr(p, "quant_state", None)
        if qs is not None and getattr(qs, "shape", None) is not None:
            n = 1
            for d in qs.shape:
                n *= d
        total += n
        trainable += n if p.requires_grad else 0
    for mod in model.modules():  # HQQLinear: W_q is packed; count the logical shape
        meta = getattr(mod, "meta", None)
        if isinstance(meta, dict) and "shape" in meta and hasattr(mod, "W_q"):
            packed = mod.W_q.numel()
            logical = 1
            for d in meta["shape"]:
                logical *= d
            total += logical - packed
    return total, trainable
