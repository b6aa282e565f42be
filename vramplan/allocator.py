"""A model of PyTorch's CUDA caching allocator: replay a stream of tensor allocations and
frees and get what ``torch.cuda.max_memory_reserved()`` would say, and where a capped
device runs out of memory.

Source modelled (docs/allocator.md lists what is and is not simulated):
  pytorch/pytorch c10/cuda/CUDACachingAllocator.cpp at 001074d25084fdb87a799823e395a50f5ec044d3
  (DeviceCachingAllocator::malloc, free, get_free_block, should_split, get_allocation_size,
  round_size, roundup_power2_next_division, alloc_found_block, free_block, try_merge_blocks,
  alloc_block, release_available_cached_blocks, release_cached_blocks, release_blocks,
  garbage_collect_cached_blocks, find_expandable_block, map_block,
  try_allocate_expandable_block, unmap_block, ExpandableSegment::map/unmap), and the config
  parser c10/core/AllocatorConfig.cpp at 065861fba7598880aa3216822742a1172d0a197c
  (AllocatorConfig::parseArgs, lexArgs, parseMaxSplitSize, parseMaxNonSplitRoundingSize,
  parseGarbageCollectionThreshold, parseRoundUpPower2Divisions, roundup_power2_divisions).
Checked against the later device-generic c10/core/CachingDeviceAllocator.h (expandable
blocks skipped by release_available_cached_blocks and garbage collection) and torch 2.13's
installed headers c10/core/AllocatorConfig.h and c10/cuda/CUDAAllocatorConfig.h (constants,
keys, large_segment_size_mb, per_process_memory_fraction). docs/allocator.md has the table.

Integer bytes everywhere. One device, the default pools (no CUDA-graph private pools).
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass, field

import numpy as np

from vramplan.errors import VramplanError

# CUDACachingAllocator.cpp, top of namespace Native.
K_MIN_BLOCK_SIZE = 512  # kMinBlockSize: all sizes are rounded to at least 512 bytes
K_SMALL_SIZE = 1 << 20  # kSmallSize: largest "small" allocation is 1 MiB
K_SMALL_BUFFER = 2 << 20  # kSmallBuffer: "small" allocations are packed in 2 MiB blocks
K_LARGE_BUFFER = 20 << 20  # kLargeBuffer: "large" allocations may be packed in 20 MiB blocks
K_MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc: allocations between 1 and 10 MiB may use kLargeBuffer
K_ROUND_LARGE = 2 << 20  # kRoundLarge: round up large allocations to 2 MiB
# AllocatorConfig.cpp: roundup_power2_divisions has 16 intervals, one per power of two from 1 MiB.
K_ROUNDUP_INTERVALS = 16
K_ROUNDUP_START_LOG2 = 20
_MB = 1 << 20
# ExpandableSegment reserves virtual space for 1 1/8 of the device (find_expandable_block);
# with no capacity given the address space only has to be larger than any stream needs.
_UNBOUNDED_ADDRESS_SPACE = 1 << 50


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class AllocatorConfig:
    """The PYTORCH_CUDA_ALLOC_CONF settings that change device memory (AllocatorConfig)."""

    max_split_size: int | None = None  # bytes; None is the source's SIZE_MAX (no limit)
    max_non_split_rounding_size: int = K_LARGE_BUFFER  # tolerance for oversize reuse
    roundup_power2_divisions: tuple[int, ...] = (0,) * K_ROUNDUP_INTERVALS
    garbage_collection_threshold: float = 0.0
    expandable_segments: bool = False
    # torch 2.13 AllocatorConfig.h: large_segment_size_ (default 20 MiB) replaces kLargeBuffer
    # in get_allocation_size and as the large pool's expandable page.
    large_segment_size: int = K_LARGE_BUFFER
    # torch 2.13 CUDAAllocatorConfig.h: per_process_memory_fraction, as
    # torch.cuda.set_per_process_memory_fraction; None when the key is not given.
    per_process_memory_fraction: float | None = None

    def divisions_for(self, size: int) -> int:
        """AllocatorConfig::roundup_power2_divisions: the interval is floor(log2(size)) from 1 MiB."""
        index = size.bit_length() - 1 - K_ROUNDUP_START_LOG2
        return self.roundup_power2_divisions[min(max(index, 0), K_ROUNDUP_INTERVALS - 1)]


_CONF = "PYTORCH_CUDA_ALLOC_CONF"
_KNOWN_KEYS = (
    "max_split_size_mb, max_non_split_rounding_mb, large_segment_size_mb, "
    "garbage_collection_threshold, roundup_power2_divisions, expandable_segments, "
    "per_process_memory_fraction, backend, release_lock_on_cudamalloc, "
    "graph_capture_record_stream_reuse, throw_on_cudamalloc_oom, pinned_*"
)


def _lex(text: str) -> list[str]:
    """AllocatorConfig::lexArgs: ',', ':', '[' and ']' are tokens; spaces are dropped."""
    tokens: list[str] = []
    buf = ""
    for ch in text:
        if ch in ",:[]":
            if buf:
                tokens.append(buf)
                buf = ""
            tokens.append(ch)
        elif ch != " ":
            buf += ch
    if buf:
        tokens.append(buf)
    return tokens


class _Tokens:
    def __init__(self, text: str):
        self.items = _lex(text)
        self.i = 0

    def take(self, key: str, what: str) -> str:
        if self.i >= len(self.items):
            raise VramplanError(f"{key} expects {what}, got nothing", _CONF)
        tok = self.items[self.i]
        self.i += 1
        return tok

    def expect(self, key: str, sep: str) -> None:
        tok = self.take(key, f"'{sep}'")
        if tok != sep:
            raise VramplanError(f"{key}: expected '{sep}', got '{tok}'", _CONF)

    def peek(self) -> str | None:
        return self.items[self.i] if self.i < len(self.items) else None


def _int(key: str, tok: str) -> int:
    try:
        return int(tok)
    except ValueError:
        raise VramplanError(f"{key} expects an integer, got '{tok}'", _CONF) from None


def _pow2(key: str, value: int, zero_ok: bool) -> int:
    if not (value == 0 and zero_ok) and (value <= 0 or value & (value - 1)):
        raise VramplanError(f"{key} values must be powers of 2{' or 0' if zero_ok else ''}, got {value}", _CONF)
    return value


def _parse_mb(key: str, toks: _Tokens, above: int) -> int:
    # parseMaxSplitSize / parseMaxNonSplitRoundingSize: at least kLargeBuffer / 1 MiB = 20;
    # parseLargeSegmentSize (2.13): more than kMinLargeAlloc / 1 MiB = 10.
    toks.expect(key, ":")
    value = _int(key, toks.take(key, "a size in MiB"))
    if value <= above:
        raise VramplanError(f"{key} must be > {above}, got {value}", _CONF)
    return value * _MB


def _skip_value(key: str, toks: _Tokens) -> None:
    """ConfigTokenizer::skipKey: a single value or a [...] list."""
    toks.expect(key, ":")
    if toks.take(key, "a value") == "[":
        while toks.take(key, "']'") != "]":
            pass


def _parse_fraction(key: str, toks: _Tokens, one_ok: bool) -> float:
    toks.expect(key, ":")
    allowed = "(0.0, 1.0]" if one_ok else "(0.0, 1.0)"
    tok = toks.take(key, f"a number in {allowed}")
    try:
        value = float(tok)
    except ValueError:
        raise VramplanError(f"{key} expects a number in {allowed}, got '{tok}'", _CONF) from None
    if not (0.0 < value < 1.0 or (one_ok and value == 1.0)):
        raise VramplanError(f"{key} must be in {allowed}, got {tok}", _CONF)
    return value


def _parse_bool(key: str, toks: _Tokens) -> bool:
    toks.expect(key, ":")
    tok = toks.take(key, "True or False")
    # ConfigTokenizer::toBool takes True/False; AllocatorConfig.h's own example writes
    # "expandable_segments:true", so the lower-case spelling is taken too.
    if tok not in ("True", "False", "true", "false"):
        raise VramplanError(f"{key} expects True or False, got '{tok}'", _CONF)
    return tok in ("True", "true")


def _parse_divisions(key: str, toks: _Tokens) -> tuple[int, ...]:
    """parseRoundUpPower2Divisions: one power of 2 for every size, or [MiB:div, ..., >:div]."""
    toks.expect(key, ":")
    tok = toks.take(key, "a power of 2 or a [size_mb:divisions, ...] list")
    if tok != "[":
        return (_pow2(key, _int(key, tok), zero_ok=False),) * K_ROUNDUP_INTERVALS
    table = [0] * K_ROUNDUP_INTERVALS
    first, last_index = True, 0
    while (bound := toks.take(key, "']'")) != "]":
        toks.expect(key, ":")
        div = _pow2(key, _int(key, toks.take(key, "divisions")), zero_ok=True)
        if bound == ">":
            # The source fills from the last interval given, that interval included.
            table[last_index:] = [div] * (K_ROUNDUP_INTERVALS - last_index)
        else:
            index = min(_pow2(key, _int(key, bound), zero_ok=False).bit_length() - 1, K_ROUNDUP_INTERVALS - 1)
            if first:
                table[:index] = [div] * index
                first = False
            table[index] = div
            last_index = index
        if toks.peek() == ",":
            toks.i += 1
    return tuple(table)


# Locking, stream-reuse and early-OOM-message options: no effect on what is reserved.
_IGNORED_BOOLS = (
    "release_lock_on_cudamalloc",
    "release_lock_on_hipmalloc",
    "graph_capture_record_stream_reuse",
    "throw_on_cudamalloc_oom",
)


def _parse_one(key: str, toks: _Tokens, out: dict) -> None:
    if key == "max_split_size_mb":
        out["max_split_size"] = _parse_mb(key, toks, above=K_LARGE_BUFFER // _MB - 1)
    elif key == "max_non_split_rounding_mb":
        out["max_non_split_rounding_size"] = _parse_mb(key, toks, above=K_LARGE_BUFFER // _MB - 1)
    elif key == "large_segment_size_mb":
        out["large_segment_size"] = _parse_mb(key, toks, above=K_MIN_LARGE_ALLOC // _MB)
    elif key == "garbage_collection_threshold":
        out["garbage_collection_threshold"] = _parse_fraction(key, toks, one_ok=False)
    elif key == "per_process_memory_fraction":
        out["per_process_memory_fraction"] = _parse_fraction(key, toks, one_ok=True)
    elif key == "roundup_power2_divisions":
        out["roundup_power2_divisions"] = _parse_divisions(key, toks)
    elif key == "expandable_segments":
        out["expandable_segments"] = _parse_bool(key, toks)
    elif key == "backend":
        toks.expect(key, ":")
        value = toks.take(key, "native")
        if value != "native":
            raise VramplanError(f"backend: only 'native' (the caching allocator) is modelled, got '{value}'", _CONF)
    elif key in _IGNORED_BOOLS:
        _parse_bool(key, toks)
    elif key.startswith("pinned_"):  # the pinned host allocator's options: host memory only
        _skip_value(key, toks)
    else:
        raise VramplanError(f"unknown key '{key}' (allowed: {_KNOWN_KEYS})", _CONF)


def parse_alloc_conf(text: str | None) -> AllocatorConfig:
    """Parse a PYTORCH_CUDA_ALLOC_CONF string the way AllocatorConfig::parseArgs does.

    Raises VramplanError naming the offending key on bad input."""
    if not text:
        return AllocatorConfig()
    toks, out = _Tokens(text), dict[str, object]()
    while toks.peek() is not None:
        key = toks.take("option", "a key")
        _parse_one(key, toks, out)
        if toks.peek() is not None:
            toks.expect(key, ",")
    return AllocatorConfig(**out)  # type: ignore[arg-type]  # values typed by _parse_one


# ----------------------------------------------------------------------------- sizes


def roundup_power2_next_division(size: int, divisions: int) -> int:
    """DeviceCachingAllocator::roundup_power2_next_division."""
    if size & (size - 1) == 0:
        return size
    power2_floor = 1 << (size.bit_length() - 1)
    division = power2_floor >> (divisions.bit_length() - 1)
    if division == 0:
        return power2_floor << 1
    floor = size & ~(division - 1)
    return size if floor == size else floor + division


def round_size(size: int, config: AllocatorConfig) -> int:
    """DeviceCachingAllocator::round_size: 512-byte multiples, or the power-2 divisions."""
    if size < K_MIN_BLOCK_SIZE:
        return K_MIN_BLOCK_SIZE
    divisions = config.divisions_for(size)
    if divisions > 1 and size > K_MIN_BLOCK_SIZE * divisions:
        return roundup_power2_next_division(size, divisions)
    return -(-size // K_MIN_BLOCK_SIZE) * K_MIN_BLOCK_SIZE


def get_allocation_size(size: int, large_segment_size: int = K_LARGE_BUFFER) -> int:
    """DeviceCachingAllocator::get_allocation_size: the cudaMalloc size for a rounded request."""
    if size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if size < K_MIN_LARGE_ALLOC:
        return large_segment_size
    return -(-size // K_ROUND_LARGE) * K_ROUND_LARGE


# ----------------------------------------------------------------------------- blocks


class Block:
    """struct Block: a piece of a segment, free or allocated; prev/next link a segment's pieces."""

    __slots__ = (
        "addr",
        "allocated",
        "gc_base",
        "mapped",
        "next",
        "pool",
        "prev",
        "seg",
        "size",
        "stream",
    )

    def __init__(self, size: int, addr: int, stream: int, pool: _Pool, seg=None, mapped=True):
        self.size, self.addr, self.stream, self.pool = size, addr, stream, pool
        self.prev: Block | None = None
        self.next: Block | None = None
        self.allocated = False
        self.mapped = mapped
        self.seg: _ExpandableSegment | None = seg
        self.gc_base = 0

    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None


class _ExpandableSegment:
    """ExpandableSegment: a virtual range of ``pages`` pages of ``page`` bytes, mapped on demand."""

    __slots__ = ("base", "page", "pages")

    def __init__(self, base: int, page: int, pages: int):
        self.base, self.page, self.pages = base, page, pages


class _Pool:
    """BlockPool: free mapped blocks ordered by (stream, size, address) as BlockComparatorSize,
    and unmapped expandable ranges ordered by (stream, address) as BlockComparatorAddress."""

    __slots__ = ("by_addr", "gc_calls", "keys", "small", "unmapped")

    def __init__(self, small: bool):
        self.small = small
        self.keys: dict[int, list[tuple[int, int]]] = {}
        self.by_addr: dict[int, Block] = {}
        self.unmapped: dict[int, list[tuple[int, Block]]] = {}
        self.gc_calls = 0  # get_free_blocks_call_count

    def insert(self, b: Block) -> None:  # BlockPool::insert_into_blocks
        b.gc_base = self.gc_calls
        bisect.insort(self.keys.setdefault(b.stream, []), (b.size, b.addr))
        self.by_addr[b.addr] = b

    def erase(self, b: Block) -> None:
        keys = self.keys[b.stream]
        del keys[bisect.bisect_left(keys, (b.size, b.addr))]
        del self.by_addr[b.addr]

    def insert_unmapped(self, b: Block) -> None:
        bisect.insort(self.unmapped.setdefault(b.stream, []), (b.addr, b), key=lambda t: t[0])

    def erase_unmapped(self, b: Block) -> None:
        items = self.unmapped[b.stream]
        del items[bisect.bisect_left(items, b.addr, key=lambda t: t[0])]

    def free_blocks(self) -> list[Block]:
        """All free mapped blocks in the source's set order (stream, size, address)."""
        return [self.by_addr[a] for s in sorted(self.keys) for _, a in self.keys[s]]


@dataclass(frozen=True)
class OutOfMemory:
    """Where the allocator raised torch.OutOfMemoryError (after both retries failed)."""

    event_index: int
    requested_size: int  # the tensor's bytes
    alloc_size: int  # what the allocator tried to reserve (get_allocation_size)
    reserved: int  # reserved bytes at that moment, after the retries released the cache
    allocated: int


class CachingAllocatorModel:
    """DeviceCachingAllocator for one device: ``malloc`` returns a Block or None on OOM.

    capacity: bytes cudaMalloc / cuMemCreate can obtain in all (reserved never exceeds it);
    None is unlimited. memory_fraction_limit: allowed_memory_maximum as set by
    torch.cuda.set_per_process_memory_fraction; it is also what garbage_collection_threshold
    is a fraction of, and the source only collects garbage when it is set. Without it, the
    config's per_process_memory_fraction times capacity stands in for it."""

    def __init__(
        self,
        config: AllocatorConfig = AllocatorConfig(),
        capacity: int | None = None,
        memory_fraction_limit: int | None = None,
    ):
        self.config = config
        self.capacity = capacity
        if memory_fraction_limit is None and config.per_process_memory_fraction is not None and capacity is not None:
            memory_fraction_limit = int(config.per_process_memory_fraction * capacity)
        self.fraction_limit = memory_fraction_limit
        self.max_split = config.max_split_size if config.max_split_size is not None else 1 << 64
        self.gc_enabled = memory_fraction_limit is not None and config.garbage_collection_threshold > 0
        self.small, self.large = _Pool(True), _Pool(False)
        self._plain_rounding = not any(config.roundup_power2_divisions)
        self.reserved = 0  # total_allocated_memory / reserved_bytes
        self.allocated = 0  # allocated_bytes (rounded block sizes)
        self.segments = 0  # live cudaMalloc segments plus live expandable segments
        self.live_segments: dict[int, tuple[int, int]] = {}  # cudaMalloc'd: address -> (bytes, stream)
        self.num_alloc_retries = 0
        self.num_device_alloc = 0
        self.num_device_free = 0
        self._next_addr = 1 << 40  # fake device addresses: only their order matters

    # -- malloc / free ------------------------------------------------------------------

    def malloc(self, orig_size: int, stream: int = 0) -> Block | None:
        """DeviceCachingAllocator::malloc; None where the source raises OutOfMemoryError."""
        if self._plain_rounding:  # no roundup_power2_divisions: round_size's 512-byte rule
            size = -(-orig_size // K_MIN_BLOCK_SIZE) * K_MIN_BLOCK_SIZE or K_MIN_BLOCK_SIZE
        else:
            size = round_size(orig_size, self.config)
        pool = self.small if size <= K_SMALL_SIZE else self.large  # get_pool
        alloc_size = get_allocation_size(size, self.config.large_segment_size)
        block = self._get_free_block(pool, size, stream)
        if block is None:
            if self.gc_enabled:
                self._garbage_collect_cached_blocks()
            block = (
                self._alloc_block(pool, size, alloc_size, stream)
                or (
                    self._release_available_cached_blocks(pool, size, stream)
                    and self._alloc_block(pool, size, alloc_size, stream)
                )
                or self._retry_after_release_cached(pool, size, alloc_size, stream)
            )
        if not block:
            return None
        return self._alloc_found_block(block, size, self._should_split(block, size))

    def free(self, block: Block) -> None:
        """DeviceCachingAllocator::free without stream uses: straight to free_block."""
        block.allocated = False
        self.allocated -= block.size
        self._free_block(block)

    def empty_cache(self) -> None:
        """torch.cuda.empty_cache: release_cached_blocks."""
        self._release_cached_blocks()

    def _retry_after_release_cached(self, pool, size, alloc_size, stream) -> Block | None:
        self._release_cached_blocks()
        self.num_alloc_retries += 1
        return self._alloc_block(pool, size, alloc_size, stream)

    def _should_split(self, block: Block, size: int) -> bool:
        remaining = block.size - size
        if block.pool.small or self.config.expandable_segments:
            return remaining >= K_MIN_BLOCK_SIZE
        return size < self.max_split and remaining > K_SMALL_SIZE

    def _alloc_found_block(self, block: Block, size: int, split: bool) -> Block:
        if split:
            remaining = block
            block = Block(size, remaining.addr, remaining.stream, remaining.pool, remaining.seg)
            block.prev = remaining.prev
            if block.prev is not None:
                block.prev.next = block
            block.next = remaining
            remaining.prev = block
            remaining.addr += size
            remaining.size -= size
            remaining.pool.insert(remaining)
        block.allocated = True
        self.allocated += block.size
        return block

    def _free_block(self, block: Block) -> None:
        prev, nxt = block.prev, block.next
        if prev is not None and not prev.allocated:
            self._try_merge_blocks(block, prev)
        if nxt is not None and not nxt.allocated:
            self._try_merge_blocks(block, nxt)
        block.pool.insert(block)

    def _try_merge_blocks(self, dst: Block, src: Block | None) -> int:
        if src is None or src.allocated or dst.mapped != src.mapped:
            return 0
        if src.mapped:
            src.pool.erase(src)
        else:
            src.pool.erase_unmapped(src)
        if dst.prev is src:  # [src dst]
            dst.addr = src.addr
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:  # [dst src]
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size
        return src.size

    # -- finding a cached block -------------------------------------------------------

    def _get_free_block(self, pool: _Pool, size: int, stream: int) -> Block | None:
        if self.gc_enabled:
            pool.gc_calls += 1
        keys = pool.keys.get(stream)
        if not keys:
            return None
        i = bisect.bisect_left(keys, (size, -1))
        if i == len(keys):
            return None
        block = pool.by_addr[keys[i][1]]
        if block.seg is not None:
            # Best fit counts a block's trailing unmapped space as its size.
            while i + 1 < len(keys):
                nxt = pool.by_addr[keys[i + 1][1]]
                if block.seg is None or _expandable_size(nxt) >= _expandable_size(block):
                    break
                i, block = i + 1, nxt
        if size < self.max_split and block.size >= self.max_split:
            return None  # do not return an oversized block for a large request
        if size >= self.max_split and block.size >= size + self.config.max_non_split_rounding_size:
            return None  # oversize blocks are reused only within the rounding tolerance
        pool.erase(block)
        return block

    # -- getting new memory -----------------------------------------------------------

    def _fits(self, nbytes: int) -> bool:
        return self.capacity is None or self.reserved + nbytes <= self.capacity

    def _alloc_block(self, pool: _Pool, size: int, alloc_size: int, stream: int) -> Block | None:
        if self.fraction_limit is not None and self.reserved + alloc_size > self.fraction_limit:
            return None
        if self.config.expandable_segments:
            return self._try_allocate_expandable_block(pool, size, stream)
        if not self._fits(alloc_size):
            return None  # cudaMalloc: cudaErrorMemoryAllocation
        block = Block(alloc_size, self._next_addr, stream, pool)
        self._next_addr += alloc_size
        self.reserved += alloc_size
        self.segments += 1
        self.live_segments[block.addr] = (alloc_size, stream)
        self.num_device_alloc += 1
        return block

    def _release_block(self, block: Block) -> None:
        block.pool.erase(block)
        self.reserved -= block.size
        self.segments -= 1
        self.live_segments.pop(block.addr, None)
        self.num_device_free += 1

    def _release_available_cached_blocks(self, pool: _Pool, size: int, stream: int) -> bool:
        """Free oversize cached blocks (>= max_split_size) to fit the request: the smallest
        one that is large enough, else the largest ones first. Expandable blocks are skipped
        (CachingDeviceAllocator.h's newer release_available_cached_blocks; the older
        CUDACachingAllocator.cpp would assert in release_block)."""
        if self.config.max_split_size is None:
            return False
        target = max(size, self.max_split)
        keys = pool.keys.get(stream, [])
        i = bisect.bisect_left(keys, (target, -1))
        if i < len(keys) and pool.by_addr[keys[i][1]].seg is None:
            self._release_block(pool.by_addr[keys[i][1]])
            return True
        released = 0
        for _, addr in reversed(keys[:i]):
            block = pool.by_addr[addr]
            if released >= target or block.size < self.max_split:
                break
            if block.seg is None:
                self._release_block(block)
                released += block.size
        return released >= target

    def _release_cached_blocks(self) -> None:
        """release_cached_blocks -> release_blocks(large), release_blocks(small)."""
        for pool in (self.large, self.small):
            to_unmap = []
            for block in pool.free_blocks():
                if block.seg is not None:
                    to_unmap.append(block)
                elif not block.is_split():
                    self._release_block(block)
            for block in to_unmap:
                self._unmap_block(block)
                if not block.mapped and not block.is_split():
                    pool.erase_unmapped(block)  # release_expandable_segment
                    self.segments -= 1

    def _garbage_collect_cached_blocks(self) -> None:
        """Free whole cached large segments older than the average age until reserved is
        below garbage_collection_threshold x allowed_memory_maximum."""
        assert self.fraction_limit is not None  # gc_enabled requires it (the source's set_fraction)
        gc_threshold = int(self.config.garbage_collection_threshold * self.fraction_limit)
        if self.reserved <= gc_threshold:
            return
        target, reclaimed = self.reserved - gc_threshold, 0
        pool = self.large
        freeable = [b for b in pool.free_blocks() if not b.is_split() and b.seg is None]
        total_age = sum(pool.gc_calls - b.gc_base for b in freeable)
        freed = True
        while reclaimed < target and freed and freeable:
            age_threshold = total_age / len(freeable)
            freed, keep = False, []
            for block in freeable:
                age = pool.gc_calls - block.gc_base
                if age >= age_threshold:
                    freed = True
                    reclaimed += block.size
                    total_age -= age
                    self._release_block(block)
                else:
                    keep.append(block)
            freeable = keep

    # -- expandable segments ----------------------------------------------------------

    def _find_expandable_block(self, pool: _Pool, size: int, stream: int) -> Block:
        """The lowest-address run of free/unmapped space of this stream that fits ``size``,
        or a new segment's whole unmapped range."""
        for _, cand in pool.unmapped.get(stream, []):
            if cand.prev is not None and not cand.prev.allocated:
                cand = cand.prev
            room, walk = 0, cand  # type: int, Block | None
            while room < size and walk is not None and not walk.allocated:
                room += walk.size
                walk = walk.next
            if room >= size:
                return cand
        page = K_SMALL_BUFFER if pool.small else self.config.large_segment_size
        space = self.capacity + self.capacity // 8 if self.capacity is not None else _UNBOUNDED_ADDRESS_SPACE
        pages = -(-space // page)
        seg = _ExpandableSegment(self._next_addr, page, pages)
        self._next_addr += page * pages
        self.segments += 1
        block = Block(page * pages, seg.base, stream, pool, seg, mapped=False)
        pool.insert_unmapped(block)
        return block

    def _map_block(self, to_map: Block, size: int) -> bool:
        seg, pool = to_map.seg, to_map.pool
        assert seg is not None  # only expandable blocks are mapped
        begin = (to_map.addr - seg.base) // seg.page
        end = -(-(to_map.addr + size - seg.base) // seg.page)
        mapped = (end - begin) * seg.page
        if mapped == 0 or not self._fits(mapped):
            return False  # cuMemCreate: CUDA_ERROR_OUT_OF_MEMORY
        pool.erase_unmapped(to_map)
        to_map.mapped = True
        if mapped < to_map.size:
            rest = Block(to_map.size - mapped, to_map.addr + mapped, to_map.stream, pool, seg, mapped=False)
            rest.prev, rest.next = to_map, to_map.next
            if to_map.next is not None:
                to_map.next.prev = rest
            to_map.next = rest
            pool.insert_unmapped(rest)
            to_map.size = mapped
        self._try_merge_blocks(to_map, to_map.prev)
        self._try_merge_blocks(to_map, to_map.next)
        pool.insert(to_map)
        self.reserved += mapped
        self.num_device_alloc += 1
        return True

    def _try_allocate_expandable_block(self, pool: _Pool, size: int, stream: int) -> Block | None:
        cand = self._find_expandable_block(pool, size, stream)
        if not cand.mapped and not self._map_block(cand, min(cand.size, size)):
            return None
        while cand.size < size:
            nxt = cand.next
            assert nxt is not None  # find_expandable_block checked the room behind cand
            if not self._map_block(nxt, min(size - cand.size, nxt.size)):
                return None
            cand = nxt
        pool.erase(cand)
        return cand

    def _unmap_block(self, block: Block) -> None:
        """Unmap the whole pages inside a free expandable block (ExpandableSegment::unmap)."""
        seg, pool = block.seg, block.pool
        assert seg is not None  # only expandable blocks are unmapped
        begin = -(-(block.addr - seg.base) // seg.page)
        end = (block.addr + block.size - seg.base) // seg.page
        if begin >= end:
            return
        pool.erase(block)
        start, length = seg.base + begin * seg.page, (end - begin) * seg.page
        before, after = start - block.addr, block.size - (start - block.addr) - length
        if before > 0:
            piece = Block(before, block.addr, block.stream, pool, seg)
            _splice(piece, block.prev, block)
            pool.insert(piece)
        if after > 0:
            piece = Block(after, start + length, block.stream, pool, seg)
            _splice(piece, block, block.next)
            pool.insert(piece)
        block.addr, block.size, block.mapped = start, length, False
        self._try_merge_blocks(block, block.prev)
        self._try_merge_blocks(block, block.next)
        pool.insert_unmapped(block)
        self.reserved -= length
        self.num_device_free += 1


def _splice(block: Block, before: Block | None, after: Block | None) -> None:
    """Block::splice: put ``block`` between ``before`` and ``after``."""
    if before is not None:
        before.next = block
    block.prev = before
    if after is not None:
        after.prev = block
    block.next = after


def _expandable_size(b: Block) -> int:
    """get_free_block's expandable_size: a block plus the unmapped space right after it."""
    return b.size + (b.next.size if b.next is not None and not b.next.mapped else 0)


# ----------------------------------------------------------------------------- events


class Op(enum.IntEnum):
    ALLOC = 0
    FREE = 1


@dataclass(frozen=True, eq=False)
class EventStream:
    """Allocation events as four parallel numpy arrays: op (Op), tensor id, size in bytes
    (ignored for FREE), CUDA stream. The backward pass runs on the forward's stream unless a
    producer says otherwise, so ``stream`` is 0 for an ordinary training step."""

    ops: np.ndarray
    ids: np.ndarray
    sizes: np.ndarray
    streams: np.ndarray

    def __post_init__(self):
        n = len(self.ops)
        if not (len(self.ids) == len(self.sizes) == len(self.streams) == n):
            raise VramplanError("events: ops, ids, sizes and streams must have the same length")

    def __len__(self) -> int:
        return len(self.ops)

    @classmethod
    def from_tuples(cls, events) -> EventStream:
        """From (op, tensor id, size, stream) tuples; stream may be left out (0)."""
        rows = [tuple(e) + (0,) * (4 - len(e)) for e in events]
        cols = list(zip(*rows, strict=False)) if rows else [(), (), (), ()]
        return cls(
            np.asarray(cols[0], np.int8),
            np.asarray(cols[1], np.int64),
            np.asarray(cols[2], np.int64),
            np.asarray(cols[3], np.int64),
        )

    @classmethod
    def concat(cls, parts: list[EventStream]) -> EventStream:
        return cls(
            *(
                np.concatenate([getattr(p, f) for p in parts]) if parts else np.zeros(0, np.int64)
                for f in ("ops", "ids", "sizes", "streams")
            )
        )

    def repeat(self, times: int, id_stride: int | None = None) -> EventStream:
        """This block of events ``times`` times over; repetition r adds r x id_stride to the
        tensor ids (default: one more than the largest id), so each repetition's tensors are
        new ones and a tensor freed in a later repetition can be named by its shifted id."""
        stride = id_stride if id_stride is not None else (int(self.ids.max()) + 1 if len(self) else 0)
        shift = np.repeat(np.arange(times, dtype=np.int64) * stride, len(self))
        return EventStream(
            np.tile(self.ops, times),
            np.tile(self.ids, times) + shift,
            np.tile(self.sizes, times),
            np.tile(self.streams, times),
        )


# ----------------------------------------------------------------------------- replay


@dataclass(frozen=True, eq=False)
class ReplayResult:
    peak_allocated: int  # max_memory_allocated: rounded block sizes
    peak_reserved: int  # max_memory_reserved
    peak_requested: int  # largest sum of the tensors' own sizes
    fragmentation_at_peak: int  # reserved - allocated when reserved first reached its peak
    peak_segments: int
    final_allocated: int
    final_reserved: int
    final_segments: int
    # (bytes, stream) of each cudaMalloc'd segment at the end, largest first (not expandable ones)
    final_segment_sizes: tuple[tuple[int, int], ...]
    num_alloc_retries: int  # times the cache was emptied to retry a cudaMalloc
    events_replayed: int
    oom: OutOfMemory | None
    reserved_trace: np.ndarray | None = field(default=None)  # after each replayed event
    allocated_trace: np.ndarray | None = field(default=None)


class _Peaks:
    """Running maxima over the replay, and the optional per-event traces."""

    def __init__(self, record_trace: bool):
        self.reserved = self.allocated = self.requested = self.frag = self.segments = 0
        self.record = record_trace
        self.res_trace: list[int] = []
        self.alloc_trace: list[int] = []

    def update(self, model: CachingAllocatorModel) -> None:
        reserved, allocated = model.reserved, model.allocated
        if reserved > self.reserved:
            self.reserved, self.frag = reserved, reserved - allocated
        # Plain comparisons, not max(): this runs once per event.
        if allocated > self.allocated:  # noqa: PLR1730
            self.allocated = allocated
        if model.segments > self.segments:  # noqa: PLR1730
            self.segments = model.segments
        if self.record:
            self.res_trace.append(reserved)
            self.alloc_trace.append(allocated)


def replay(
    events: EventStream,
    config: AllocatorConfig = AllocatorConfig(),
    capacity: int | None = None,
    memory_fraction_limit: int | None = None,
    record_trace: bool = False,
) -> ReplayResult:
    """Run the events through the allocator model; stops at the first OOM (the step would raise).

    A size-0 allocation takes no block (the allocator hands out a null pointer for it)."""
    model = CachingAllocatorModel(config, capacity, memory_fraction_limit)
    live: dict[int, tuple[Block | None, int]] = {}
    peaks, requested, oom, index = _Peaks(record_trace), 0, None, 0
    rows = zip(events.ops.tolist(), events.ids.tolist(), events.sizes.tolist(), events.streams.tolist(), strict=False)
    alloc_op, malloc, free, update, record = int(Op.ALLOC), model.malloc, model.free, peaks.update, record_trace
    for index, (op, tid, size, stream) in enumerate(rows):
        if op == alloc_op:
            if tid in live:
                raise VramplanError(f"event {index}: tensor {tid} allocated twice", "events")
            block = malloc(size, stream) if size > 0 else None
            if block is None and size > 0:
                oom = OutOfMemory(
                    index,
                    size,
                    get_allocation_size(round_size(size, config), config.large_segment_size),
                    model.reserved,
                    model.allocated,
                )
                break
            live[tid] = (block, size)
            requested += size
            if requested > peaks.requested:  # noqa: PLR1730 (hot loop)
                peaks.requested = requested
        else:
            if tid not in live:
                raise VramplanError(f"event {index}: tensor {tid} freed but not allocated", "events")
            block, size = live.pop(tid)
            requested -= size
            if block is not None:
                free(block)
            if not record:
                continue  # a free raises no maximum: only the traces need every event
        update(model)
    return _result(model, peaks, oom, index if oom else len(events))


def _result(model: CachingAllocatorModel, peaks: _Peaks, oom: OutOfMemory | None, replayed: int) -> ReplayResult:
    return ReplayResult(
        peak_allocated=peaks.allocated,
        peak_reserved=peaks.reserved,
        peak_requested=peaks.requested,
        fragmentation_at_peak=peaks.frag,
        peak_segments=peaks.segments,
        final_allocated=model.allocated,
        final_reserved=model.reserved,
        final_segments=model.segments,
        final_segment_sizes=tuple(sorted(model.live_segments.values(), reverse=True)),
        num_alloc_retries=model.num_alloc_retries,
        events_replayed=replayed,
        oom=oom,
        reserved_trace=np.asarray(peaks.res_trace, np.int64) if peaks.record else None,
        allocated_trace=np.asarray(peaks.alloc_trace, np.int64) if peaks.record else None,
    )
