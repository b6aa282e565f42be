"""GPU hardware profiles (data files in hardware_profiles/ and the user's config folder) and
the --gpus parser.

A size without a card (`--gpus 2x24GB`) stands for a named known card: the slowest profile
sold with that size (see `size_profile`), so that a bare size is never priced faster than a
card people actually buy with that much memory.
"""

from __future__ import annotations

import math
import os
import re
import sys
from decimal import Decimal
from enum import Enum
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vramplan import nvml
from vramplan.errors import VramplanError
from vramplan.units import GiB, MiB, TiB

_FLAG = "--gpus"

# Parser bounds: far above any real machine, low enough that no arithmetic overflows.
MAX_GPU_COUNT = 4096  # GPUs in one --gpus (all nodes together)
MAX_GPU_MEMORY = 2 * TiB  # memory of one GPU (an MI355X has 288 GB)
MAX_GPU_TFLOPS = 100_000.0  # --gpu-tflops (a B200 has ~2,250 dense BF16)
MAX_GPU_BANDWIDTH = 100_000.0  # --gpu-bandwidth, GB/s (a B200 has 8,000)


class Vendor(str, Enum):
    NVIDIA = "nvidia"
    AMD = "amd"


class HardwareProfile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    display_name: str
    vendor: Vendor = Vendor.NVIDIA
    nvml_names: list[str] = Field(default_factory=list)
    aliases: list[str] = Field(
        default_factory=list, description="other names --gpus accepts for this card (h100 for h100-80gb)"
    )
    nominal_memory_gb: float = Field(
        gt=0, le=MAX_GPU_MEMORY / GiB, description="memory the card is sold with, GiB of chips"
    )
    memory_bytes: int = Field(gt=0, description="what torch.cuda.mem_get_info() reports as total")
    memory_bytes_source: str = ""
    bf16: bool = Field(True, description="the tensor cores run bf16 (Ampere and later; not Turing or Volta)")
    bf16_dense_tflops: float | None = Field(None, gt=0, description="dense bf16 tensor TFLOP/s, FP32 accumulate")
    fp16_dense_tflops: float | None = Field(None, gt=0, description="dense fp16 tensor TFLOP/s, FP32 accumulate")
    memory_bandwidth_gbps: float = Field(gt=0)
    datasheet: str = Field("", description="where the TFLOP/s and bandwidth figures come from")
    host_link: str = "PCIe 4.0 x16"
    host_link_gbps: float = Field(25.0, gt=0, description="usable host<->GPU bandwidth, one direction, GB/s")
    nvlink_gbps: float | None = None
    cuda_context_bytes: int = Field(419430400, ge=0, description="CUDA context outside torch's statistics")
    compute_capability: str = ""
    software_notes: str = Field("", description="what the training libraries support on this card (ROCm, ...)")
    stands_for_size: bool = Field(
        False, description="what a bare size (--gpus 24GB) means: the most owned training card of that size"
    )
    notes: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> HardwareProfile:
        if self.bf16 and self.bf16_dense_tflops is None:
            raise ValueError("bf16_dense_tflops is required (or set bf16 to false for a card without bf16)")
        if not self.bf16 and self.bf16_dense_tflops is not None:
            raise ValueError("bf16 is false but bf16_dense_tflops is given")
        if not self.bf16 and self.fp16_dense_tflops is None:
            raise ValueError("fp16_dense_tflops is required for a card without bf16")
        if self.memory_bytes > self.nominal_memory_gb * GiB:
            raise ValueError("memory_bytes (usable) is larger than nominal_memory_gb (what the card is sold with)")
        return self

    @property
    def training_tflops(self) -> float:
        """Dense tensor TFLOP/s of the mixed-precision step: bf16, or fp16 on a card without bf16."""
        rate = self.bf16_dense_tflops if self.bf16_dense_tflops is not None else self.fp16_dense_tflops
        assert rate is not None  # _consistent: a card without bf16 has an fp16 rate
        return rate

    @property
    def cublas_workspace_bytes(self) -> int:
        # torch's default CUBLAS_WORKSPACE_CONFIG: ":4096:8" (32 MiB) on sm90+, else ":4096:2:16:8" (~8 MiB)
        major = int(self.compute_capability.split(".")[0]) if self.compute_capability[:1].isdigit() else 9
        return 32 * 2**20 if major >= 9 else 8 * 2**20 + 128 * 2**10


class GpuSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    count: int
    profile: HardwareProfile
    label: str = Field(description="how the user spelled it, resolved")
    notes: tuple[str, ...] = Field((), description="how the card was resolved, for the estimate's notes")


def supports_bf16(profile: HardwareProfile) -> bool:
    """Whether the card's tensor cores run bf16 (compute capability 8.0+ on NVIDIA)."""
    return profile.bf16


def gpu_notes(gpus: GpuSpec) -> list[str]:
    """Notes an estimate on these GPUs carries: how the card was resolved, and no-bf16 cards."""
    notes = list(gpus.notes)
    if not supports_bf16(gpus.profile):
        notes.append(
            f"{gpus.profile.display_name} has no bf16 (compute capability {gpus.profile.compute_capability}): "
            "mixed precision runs in fp16 with a loss scaler there; its memory is that of the bf16 step "
            f"(both 2 bytes), its speed the fp16 tensor rate ({gpus.profile.fp16_dense_tflops:g} TFLOP/s)"
        )
    if gpus.profile.vendor != Vendor.NVIDIA:
        # the memory model's CUDA context and cuBLAS workspace are NVIDIA's; nobody measured ROCm's yet
        notes.append(
            f"{gpus.profile.display_name} runs ROCm: the CUDA context and cuBLAS workspace in this estimate "
            f"are NVIDIA's defaults, not measured there. {gpus.profile.software_notes}".strip()
        )
    return notes


# ------------------------------------------------------------------ loading


def _profile_dir() -> Path:
    here = Path(__file__).parent
    for cand in (here / "_hardware_profiles", here.parent / "hardware_profiles"):
        if cand.is_dir():
            return cand
    raise VramplanError("hardware profiles are missing from this installation")


def user_profile_dir() -> Path:
    """$XDG_CONFIG_HOME/vramplan/hardware (default ~/.config/vramplan/hardware): the user's own cards."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "vramplan" / "hardware"


def _read_profile_file(path: Path) -> dict:
    """A profile file read through the regular-file boundary (vramplan.files: no device, pipe
    or file over 1 MiB; strict JSON, bounded nesting)."""
    from vramplan.files import parse_json, read_regular

    what = f"hardware profile {path}"
    data = read_regular(path, 2**20, "hardware profile")
    if path.suffix != ".toml":
        parsed = parse_json(data, str(path), "hardware profile")
        if not isinstance(parsed, dict):
            raise VramplanError(f"{what}: expected an object of fields")
        return parsed
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise VramplanError(f"{what}: TOML needs Python 3.11+; write it as JSON") from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise VramplanError(f"{what}: not valid TOML ({type(e).__name__}: {str(e)[:200]})") from None


def load_profile(path: Path) -> HardwareProfile:
    """One profile file (.json or .toml); errors are one line naming the file and the key."""
    data = _read_profile_file(path)
    try:
        prof = HardwareProfile.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(profile)"
        raise VramplanError(f"hardware profile {path}: key {key}: {err['msg']}") from None
    if prof.name != path.stem:
        raise VramplanError(f"hardware profile {path}: key name: {prof.name!r} must match the file name {path.stem!r}")
    return prof


@lru_cache(maxsize=8)
def _load(bundled: Path, user: Path) -> dict[str, HardwareProfile]:
    out = {}
    for path in sorted(bundled.glob("*.json")):
        prof = load_profile(path)
        out[prof.name] = prof
    if user.is_dir():  # the user's files come last: a user profile replaces a bundled one of that name
        for path in sorted([*user.glob("*.json"), *user.glob("*.toml")]):
            prof = load_profile(path)
            out[prof.name] = prof
    return out


def profiles() -> dict[str, HardwareProfile]:
    """Bundled profiles plus the user's (user_profile_dir()), by name."""
    return _load(_profile_dir(), user_profile_dir())


# ------------------------------------------------------------------ sizes


def _slowest(cards: list[HardwareProfile]) -> HardwareProfile:
    """The slowest of these cards for a training step: bf16-capable cards first (the estimate is
    of a bf16 step), then the least dense tensor TFLOP/s (a training step is matmul-bound: the
    compute term dominates docs/throughput.md's roofline), then the least bandwidth."""
    with_bf16 = [p for p in cards if p.bf16] or cards
    return min(with_bf16, key=lambda p: (p.training_tflops, p.memory_bandwidth_gbps, p.name))


def _sized_cards() -> dict[int, list[HardwareProfile]]:
    """NVIDIA profiles by the size they are sold with, in bytes (a bare size is an NVIDIA card:
    the CUDA context and cuBLAS workspace of the estimate are NVIDIA's)."""
    out: dict[int, list[HardwareProfile]] = {}
    for p in profiles().values():
        if p.vendor == Vendor.NVIDIA:
            out.setdefault(round(p.nominal_memory_gb * GiB), []).append(p)
    return dict(sorted(out.items()))


def _roomiest(cards: list[HardwareProfile]) -> HardwareProfile:
    """The card a size stands for: the profile marked `stands_for_size` (the most owned training
    card of that size: the RTX 3090 for 24 GB), else the bf16 card with the most usable memory.
    A card that keeps memory back (the A10G's ECC) or has no bf16 is named by its profile."""
    marked = [p for p in cards if p.stands_for_size]
    with_bf16 = marked or [p for p in cards if p.bf16] or cards
    return max(with_bf16, key=lambda p: (p.memory_bytes, p.name))


def size_profile(size_bytes: int) -> tuple[HardwareProfile, str]:
    """The card a bare size stands for, and a note saying which.

    Memory: a size sold by known cards has the usable memory of the roomiest of them
    (`_roomiest`). Speed: never above any known card of that size, so the slowest of them
    (`_slowest`). Any other size takes both from the next smaller known size (below the smallest
    known size: the slowest card of all). Usable memory is monotone in the size and never above
    it: the reference card's usable fraction scaled to the size, capped by the usable memory of
    every larger known size."""
    sized = _sized_cards()
    sizes = list(sized)
    below = [s for s in sizes if s <= size_bytes]
    ref_size = below[-1] if below else sizes[0]
    ref, room = _slowest(sized[ref_size]), _roomiest(sized[ref_size])
    scaled = room.memory_bytes * size_bytes // ref_size
    caps = [_roomiest(sized[s]).memory_bytes for s in sizes if s >= size_bytes]
    usable = min([scaled, *caps])
    gib = size_bytes / GiB
    name = f"{gib:g}GB"
    if ref_size == size_bytes:
        why = f"{name} as {room.name} (usable {usable / GiB:.2f} GiB, the card this size stands for)"
        if ref.name != room.name:
            why += f", priced as {ref.name} (the slowest known {gib:g} GB card)"
    elif below:
        why = (
            f"{name} (no known card of this size) priced as {ref.name}, the slowest known card of the next "
            f"smaller size ({ref_size / GiB:g} GB); usable memory {usable / GiB:.2f} GiB, {room.name}'s reported "
            "fraction of the size"
        )
    else:
        ref = _slowest([p for cards in sized.values() for p in cards])
        why = (
            f"{name} (smaller than any known card) priced as {ref.name}, the slowest known card; usable "
            f"memory {usable / GiB:.2f} GiB"
        )
    shown = room.name if ref_size == size_bytes else ref.name
    prof = ref.model_copy(
        update={
            "name": name,
            "display_name": f"{gib:g} GB GPU (as {shown})",
            "nominal_memory_gb": gib,
            "memory_bytes": usable,
            "nvml_names": [],
            "memory_bytes_source": why,
        }
    )
    return prof, why


# ------------------------------------------------------------------ parsing

_SPEC = re.compile(r"^\s*(?:(\d+)\s*[x*]\s*)?(.+?)\s*$", re.I)
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(gb|gib|g)$", re.I)


def _count(digits: str | None, text: str) -> int:
    if digits is None:
        return 1
    if len(digits.lstrip("0")) > len(str(MAX_GPU_COUNT)) or int(digits) > MAX_GPU_COUNT:
        raise VramplanError(f"GPU count in {text[:40]!r} is above the limit of {MAX_GPU_COUNT} GPUs", _FLAG)
    if int(digits) < 1:
        raise VramplanError(f"GPU count must be positive in {text[:40]!r}", _FLAG)
    return int(digits)


def _size_bytes(number: str, text: str) -> int:
    """'24' (GiB) -> bytes, exactly (Decimal: '141.5' is not rounded through a float)."""
    limit = MAX_GPU_MEMORY // GiB
    if len(number.split(".")[0].lstrip("0")) > len(str(limit)) or Decimal(number) > limit:
        raise VramplanError(f"GPU memory in {text[:40]!r} is above the limit of {limit} GB per GPU", _FLAG)
    size = int(Decimal(number) * GiB)
    if size < MiB:
        raise VramplanError(f"GPU memory must be at least 1 MiB in {text[:40]!r}", _FLAG)
    return size


def parse_gpus(text: str) -> GpuSpec:
    """'2x24GB', 'rtx-4090', '2xrtx-3090', '8x80GB' -> GpuSpec."""
    m = _SPEC.match(text or "")
    if not m:
        raise VramplanError(f"cannot read {text!r}; use NxSIZE (2x24GB), a profile (rtx-4090) or Nxprofile", _FLAG)
    count = _count(m.group(1), text)
    what = m.group(2).lower()
    size = _SIZE.match(what)
    notes: tuple[str, ...] = ()
    if size:
        prof, why = size_profile(_size_bytes(size.group(1), text))
        notes = (why,)
    else:
        prof, notes = _profile_named(what)
    return GpuSpec(count=count, profile=prof, label=f"{count}x{prof.name}", notes=notes)


_FAMILY = re.compile(r"^(rtx|gtx)(\d)")


def _profile_named(what: str) -> tuple[HardwareProfile, tuple[str, ...]]:
    """A profile by its name, an alias in its file (h100 -> h100-80gb), or the usual spellings
    of the name (RTX4090, geforce_rtx_4090, 4090); a family with several sizes (a100, v100)
    is one line listing them, and a name that only prefixes another card's is not guessed."""
    known = profiles()
    key = _FAMILY.sub(r"\1-\2", re.sub(r"[\s_]+", "-", what.strip().lower()))
    key = re.sub(r"^(nvidia-)?(geforce-)?", "", key)
    if key in known:
        return known[key], () if key == what else (f"{what!r} read as {key}",)
    by_alias = {a: p for p in known.values() for a in p.aliases}
    for cand in (key, f"rtx-{key}"):
        prof = by_alias.get(cand) or known.get(cand)
        if prof is not None:
            return prof, (f"{what!r} read as {prof.name} ({prof.display_name})",)
    # a100 is two cards; rtx-4060 (8 GB) is not the rtx-4060-ti-16gb it prefixes: never guessed
    family = sorted(n for n in known if n.startswith(key + "-"))
    if len(family) > 1:
        raise VramplanError(f"{what!r} is more than one card: {', '.join(family)}", _FLAG)
    if family:
        raise VramplanError(
            f"unknown GPU {what[:40]!r} (not {family[0]}, which it prefixes); use NxSIZE (e.g. 1x8GB) "
            f"or add a profile file to {user_profile_dir()}",
            _FLAG,
        )
    raise VramplanError(
        f"unknown GPU {what[:40]!r}; use NxSIZE (e.g. 2x24GB) or one of: {', '.join(known)} "
        f"(or add a profile file to {user_profile_dir()})",
        _FLAG,
    )


# ------------------------------------------------------------------ overrides


def _positive_number(value: float | str, flag: str, limit: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise VramplanError(f"expected a number, got {value!r}", flag) from None
    if not (math.isfinite(number) and 0 < number <= limit):
        raise VramplanError(f"must be above 0 and at most {limit:,.0f}, got {value!r}", flag)
    return number


def with_overrides(
    gpus: GpuSpec,
    *,
    tflops: float | str | None = None,
    bandwidth_gbps: float | str | None = None,
    reserve_bytes: int | None = None,
    reserve_source: str = "--reserve",
) -> GpuSpec:
    """GPUs with the speed the user states (--gpu-tflops: the dense tensor rate of the step,
    bf16 or fp16 on a card without bf16; --gpu-bandwidth, GB/s) and memory already taken on
    each card (--reserve, or NVML's used memory on detected GPUs) subtracted from usable."""
    update: dict = {}
    notes = list(gpus.notes)
    prof = gpus.profile
    if tflops is not None:
        rate = _positive_number(tflops, "--gpu-tflops", MAX_GPU_TFLOPS)
        update["bf16_dense_tflops" if prof.bf16 else "fp16_dense_tflops"] = rate
        notes.append(f"speed: {rate:g} dense TFLOP/s (--gpu-tflops) instead of {prof.training_tflops:g}")
    if bandwidth_gbps is not None:
        bw = _positive_number(bandwidth_gbps, "--gpu-bandwidth", MAX_GPU_BANDWIDTH)
        update["memory_bandwidth_gbps"] = bw
        notes.append(f"memory bandwidth: {bw:g} GB/s (--gpu-bandwidth) instead of {prof.memory_bandwidth_gbps:g}")
    if reserve_bytes:
        if reserve_bytes >= prof.memory_bytes:
            raise VramplanError(
                f"{reserve_bytes / GiB:.2f} GiB is not below the card's usable {prof.memory_bytes / GiB:.2f} GiB",
                "--reserve",
            )
        update["memory_bytes"] = prof.memory_bytes - reserve_bytes
        notes.append(
            f"{reserve_bytes / GiB:.2f} GiB per GPU already in use is subtracted ({reserve_source}): "
            f"{update['memory_bytes'] / GiB:.2f} GiB of {prof.memory_bytes / GiB:.2f} GiB left"
        )
    if not update:
        return gpus
    return gpus.model_copy(update={"profile": prof.model_copy(update=update), "notes": tuple(notes)})


# ------------------------------------------------------------------ detection


def detected_used_bytes() -> int | None:
    """Memory other processes (a desktop, another job) use on the busiest detected GPU before the
    run, per NVML; None without an NVIDIA GPU. What `--reserve` defaults to on detected GPUs."""
    try:
        found, _ = nvml.devices()
    except nvml.NvmlUnavailable:
        return None
    return max((d.used_bytes for d in found), default=None)


def detect_gpus() -> GpuSpec | None:
    """The local GPUs via NVML, matched to a profile by name (else by memory size)."""
    found = nvml.first_device()
    if found is None:
        return None
    n, gpu = found
    name, total = gpu.name, gpu.total_bytes
    for prof in profiles().values():
        if name in prof.nvml_names:
            return GpuSpec(count=n, profile=prof, label=f"{n}x{prof.name}", notes=())
    # NVML's total includes the driver's reservation, which torch's total does not: take 99% of it,
    # and never more than the size rule gives for that many GiB
    sized, why = size_profile(min(max(round(total / GiB), 1) * GiB, MAX_GPU_MEMORY))
    usable = min(int(total * 0.99), sized.memory_bytes)
    prof = sized.model_copy(update={"memory_bytes": usable, "display_name": name})
    return GpuSpec(
        count=n,
        profile=prof,
        label=f"{n}x{name}",
        notes=(f"{name} has no profile: usable memory {usable / GiB:.2f} GiB from NVML; speed of {why}",),
    )


def no_gpu_message() -> str:
    """What the tool can do on a machine where detection finds no NVIDIA GPU (a Mac, an AMD box)."""
    where = "this Mac" if sys.platform == "darwin" else "this machine"
    amd = Path("/dev/kfd").exists()  # the ROCm kernel driver: an AMD GPU that NVML cannot see
    extra = " (AMD GPUs are not detected; name them: --gpus mi300x or --gpus rx-7900-xtx)" if amd else ""
    return (
        f"no NVIDIA GPU detected on {where}{extra}; vramplan still estimates and plans for GPUs you name with "
        "--gpus (e.g. --gpus 1x24GB, --gpus 2xrtx-4090; `vramplan hardware` lists the profiles), and "
        "`vramplan verify MODEL --device cpu` traces a small step on the CPU"
    )
