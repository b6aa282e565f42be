"""A model too large for the local GPU: measure truncated depths, fit fixed + per-layer, extrapolate.

Decoder layers are identical, so every allocated quantity of the reference step is affine
in the depth L: value(L) = fixed + per_layer * L (fixed: embeddings, head, logits and
loss, CUDA workspaces; per layer: weights, grads, states, saved activations). Least
squares over two or more depths; with three or more the residual says how affine it was.
"""

from __future__ import annotations

from vramplan.categories import Category
from vramplan.errors import VramplanError
from vramplan.verify.results import Extrapolation, Measurement

_FLAG = "--depths"


def fit(depths: list[int], values: list[int], full_layers: int, quantity: str = "") -> Extrapolation:
    """Least-squares line through (depth, value), evaluated at full_layers."""
    if len(set(depths)) < 2:
        raise VramplanError(f"need at least two different depths to extrapolate, got {depths}", _FLAG)
    n = len(depths)
    mx, my = sum(depths) / n, sum(values) / n
    sxx = sum((d - mx) ** 2 for d in depths)
    slope = sum((d - mx) * (v - my) for d, v in zip(depths, values, strict=False)) / sxx
    fixed = my - slope * mx
    resid = max(abs(fixed + slope * d - v) for d, v in zip(depths, values, strict=False))
    return Extrapolation(
        depths=list(depths),
        full_layers=full_layers,
        quantity=quantity,
        values=list(values),
        fixed_bytes=fixed,
        per_layer_bytes=slope,
        predicted_bytes=round(fixed + slope * full_layers),
        max_residual_bytes=resid,
    )


def choose_depths(full_layers: int, fits_at, max_depth: int = 8, even: bool = False) -> list[int]:
    """Two depths (d/2, d) with d the deepest truncation the estimate says fits (capped:
    deeper only costs time). `fits_at(L) -> bool`. `even` for alternating layer types."""
    top = min(full_layers - 1, max_depth)
    step = 2 if even else 1
    deepest = next((d for d in range(top - top % step, 0, -step) if fits_at(d)), None)
    if deepest is None or deepest < 2 * step:
        raise VramplanError(f"even {2 * step} layers do not fit this GPU; nothing to extrapolate from", "--num-layers")
    low = max(step, deepest // 2 - (deepest // 2) % step)
    return [low, deepest]


_QUANTITIES = ("peak_allocated_bytes", "peak_reserved_bytes", "after_build_bytes", "after_step0_bytes")


def extrapolate(
    measured: list[Measurement], capacity_bytes: int | None = None
) -> tuple[Measurement, list[Extrapolation]]:
    """The full-depth Measurement predicted from truncated ones (every quantity and category)."""
    ok = [m for m in measured if m.fits]
    if len({m.num_layers for m in ok}) < 2:
        # a run that does not fit carries its OomInfo (measure sets both together)
        failed = [
            f"{m.num_layers} layers: out of memory in {m.oom.phase}"  # type: ignore[union-attr]
            for m in measured
            if not m.fits
        ]
        raise VramplanError("fewer than two truncated depths ran; " + "; ".join(failed), _FLAG)
    full = ok[0].full_layers
    depths = [m.num_layers for m in ok]
    fits, values = [], {}
    for q in _QUANTITIES:
        vals = [getattr(m, q) for m in ok]
        if all(v is not None for v in vals):
            f = fit(depths, vals, full, q)
            fits.append(f)
            values[q] = f.predicted_bytes
    breakdown: dict[Category, int | None] = {}
    for c in Category:
        vals = [m.breakdown.get(c) for m in ok]
        if all(v is not None for v in vals):
            f = fit(depths, vals, full, c.value)
            fits.append(f)
            breakdown[c] = max(f.predicted_bytes, 0)
        else:
            breakdown[c] = None
    # the CUDA context does not grow with depth: take the measured value, not a fit
    breakdown[Category.CUDA_CONTEXT] = ok[-1].breakdown.get(Category.CUDA_CONTEXT)
    fit_ok = True
    if capacity_bytes is not None and values.get("peak_reserved_bytes") is not None:
        fit_ok = values["peak_reserved_bytes"] + (breakdown[Category.CUDA_CONTEXT] or 0) <= capacity_bytes
    base = ok[-1]
    note = (
        f"EXTRAPOLATED to {full} layers from measured depths {sorted(depths)} "
        f"(least squares: fixed + per-layer x L); not a measurement at full depth"
    )
    out = base.model_copy(
        update=dict(
            num_layers=full,
            fits=fit_ok,
            oom=None,
            phases=[],
            step_peaks_bytes=[],
            breakdown=breakdown,
            extrapolated_from=sorted(depths),
            notes=[note, *base.notes],
            tokens_per_s=None,
            step_s=[],
            params_total=_affine_count(ok, full, "params_total"),
            params_trainable=_affine_count(ok, full, "params_trainable"),
            nvml_used_bytes=None,
            **values,
        )
    )
    return out, fits


def _affine_count(ok: list[Measurement], full: int, attr: str) -> int:
    return fit([m.num_layers for m in ok], [getattr(m, attr) for m in ok], full).predicted_bytes
