"""The allocator model against rules read from PyTorch's CUDACachingAllocator.cpp
(commit 001074d2, see vramplan/allocator.py). Every expected value below is worked out by
hand from the C++ functions named in each test, never by running the model."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vramplan.allocator import (
    AllocatorConfig,
    CachingAllocatorModel,
    EventStream,
    Op,
    get_allocation_size,
    parse_alloc_conf,
    replay,
    round_size,
    roundup_power2_next_division,
)
from vramplan.errors import VramplanError

KiB, MiB = 1 << 10, 1 << 20
A, F = Op.ALLOC, Op.FREE


def run(rows, conf="", **kw):
    return replay(EventStream.from_tuples(rows), parse_alloc_conf(conf), **kw)


# ---------------------------------------------------------------- sizes (round_size, get_allocation_size)


def test_round_size_512_bytes():
    cfg = AllocatorConfig()
    assert round_size(1, cfg) == 512
    assert round_size(512, cfg) == 512
    assert round_size(513, cfg) == 1024
    assert round_size(5 * MiB + 1, cfg) == 5 * MiB + 512


def test_roundup_power2_divisions():
    # The source comment's example: 1200 with 4 divisions -> 1280.
    assert roundup_power2_next_division(1200, 4) == 1280
    assert roundup_power2_next_division(4096, 4) == 4096  # a power of 2 stays
    cfg = parse_alloc_conf("roundup_power2_divisions:4")
    # 5 MiB + 1 lies in [4, 8) MiB, whose quarters are 1 MiB: -> 6 MiB.
    assert round_size(5 * MiB + 1, cfg) == 6 * MiB
    # Below 512 x divisions the 512-byte rule applies (round_size's size > kMinBlockSize * divisions).
    assert round_size(1200, cfg) == 1536


def test_allocation_size_per_pool():
    assert get_allocation_size(512) == 2 * MiB  # small pool: kSmallBuffer
    assert get_allocation_size(1 * MiB) == 2 * MiB
    assert get_allocation_size(1 * MiB + 512) == 20 * MiB  # large, < kMinLargeAlloc: kLargeBuffer
    assert get_allocation_size(10 * MiB - 512) == 20 * MiB
    assert get_allocation_size(10 * MiB) == 10 * MiB  # rounded up to kRoundLarge
    assert get_allocation_size(12 * MiB + 512) == 14 * MiB


# ---------------------------------------------------------------- segments and splitting


def test_one_kib_reserves_a_small_segment():
    r = run([(A, 1, KiB)])
    assert (r.peak_reserved, r.peak_allocated, r.final_segments) == (2 * MiB, KiB, 1)
    assert r.fragmentation_at_peak == 2 * MiB - KiB


def test_five_mib_reserves_twenty():
    assert run([(A, 1, 5 * MiB)]).peak_reserved == 20 * MiB


def test_twelve_mib_reserves_its_size_rounded_to_two_mib():
    assert run([(A, 1, 12 * MiB)]).peak_reserved == 12 * MiB
    assert run([(A, 1, 13 * MiB)]).peak_reserved == 14 * MiB


def test_small_requests_pack_into_two_mib_segments():
    # Two 1 MiB requests share one 2 MiB segment (small pool: remaining >= kMinBlockSize splits);
    # the third needs a new segment.
    r = run([(A, 1, MiB), (A, 2, MiB), (A, 3, MiB)])
    assert (r.final_reserved, r.final_segments) == (4 * MiB, 2)


def test_small_and_large_pools_are_separate():
    # A freed 2 MiB small segment cannot serve a 1.5 MiB (large) request.
    r = run([(A, 1, MiB), (F, 1, 0), (A, 2, MiB + MiB // 2)])
    assert r.final_reserved == 22 * MiB


def test_freed_split_block_is_reused_by_a_smaller_tensor():
    # 5 MiB splits a 20 MiB segment (remaining 15 MiB > kSmallSize); 6 MiB fits the cached 15 MiB.
    r = run([(A, 1, 5 * MiB), (A, 2, 6 * MiB)])
    assert (r.final_reserved, r.final_allocated, r.final_segments) == (20 * MiB, 11 * MiB, 1)


def test_large_remainder_of_one_mib_or_less_is_not_split():
    # should_split (large pool): remaining > kSmallSize. 19.5 MiB from a cached 20 MiB block
    # leaves 0.5 MiB, so the whole 20 MiB is handed out and counted as allocated.
    r = run([(A, 1, 5 * MiB), (F, 1, 0), (A, 2, 19 * MiB + 512 * KiB)])
    assert (r.final_allocated, r.final_reserved) == (20 * MiB, 20 * MiB)


def test_free_merges_neighbours():
    # Three 5 MiB pieces of one 20 MiB segment; freeing the first two merges them into 10 MiB,
    # which a 10 MiB request then reuses instead of a new cudaMalloc (try_merge_blocks).
    rows = [(A, 1, 5 * MiB), (A, 2, 5 * MiB), (A, 3, 5 * MiB), (F, 2, 0), (F, 1, 0), (A, 4, 10 * MiB)]
    r = run(rows)
    assert (r.final_reserved, r.final_segments) == (20 * MiB, 1)


def test_blocks_belong_to_their_stream():
    r = run([(A, 1, 5 * MiB, 0), (F, 1, 0, 0), (A, 2, 5 * MiB, 1)])
    assert (r.final_reserved, r.final_segments) == (40 * MiB, 2)


def test_best_fit_takes_the_smallest_cached_block():
    # Cached 30 and 12 MiB segments; an 11 MiB request takes the 12 MiB one (lower_bound on size),
    # and a following 28 MiB request still finds the 30 MiB one.
    rows = [(A, 1, 30 * MiB), (A, 2, 12 * MiB), (F, 1, 0), (F, 2, 0), (A, 3, 11 * MiB), (A, 4, 28 * MiB)]
    assert run(rows).final_reserved == 42 * MiB


# ---------------------------------------------------------------- max_split_size_mb


def test_max_split_size_keeps_oversize_blocks_whole():
    rows = [(A, 1, 40 * MiB), (F, 1, 0), (A, 2, 12 * MiB)]
    # Without the option the cached 40 MiB segment is split for 12 MiB.
    assert run(rows).final_reserved == 40 * MiB
    # With max_split_size 20 MiB, get_free_block refuses an oversize block for a smaller request.
    assert run(rows, "max_split_size_mb:20").final_reserved == 52 * MiB


def test_oversize_block_reused_within_rounding_tolerance():
    # size >= max_split: a cached block is used whole if smaller than size + kLargeBuffer.
    r = run([(A, 1, 40 * MiB), (F, 1, 0), (A, 2, 30 * MiB)], "max_split_size_mb:20")
    assert (r.final_reserved, r.final_allocated) == (40 * MiB, 40 * MiB)
    r = run([(A, 1, 60 * MiB), (F, 1, 0), (A, 2, 30 * MiB)], "max_split_size_mb:20")
    assert r.final_reserved == 90 * MiB
    r = run([(A, 1, 60 * MiB), (F, 1, 0), (A, 2, 30 * MiB)], "max_split_size_mb:20,max_non_split_rounding_mb:40")
    assert r.final_reserved == 60 * MiB


def test_release_available_cached_blocks_frees_only_an_oversize_block():
    # Cached: 90 MiB (oversize, too big to reuse for 60 MiB: 90 >= 60 + 20) and 12 MiB.
    # cudaMalloc(60 MiB) fails at 120 MiB; release_available_cached_blocks frees the 90 MiB block
    # only, the retry succeeds, and the full release_cached_blocks never runs.
    rows = [(A, 1, 90 * MiB), (A, 2, 12 * MiB), (F, 1, 0), (F, 2, 0), (A, 3, 60 * MiB)]
    r = run(rows, "max_split_size_mb:20", capacity=120 * MiB)
    assert r.oom is None
    assert (r.final_reserved, r.num_alloc_retries) == (72 * MiB, 0)


def test_release_available_cached_blocks_frees_largest_oversize_first():
    # No single cached block >= 60 MiB: release_available_cached_blocks frees the oversize ones
    # from the largest down (40, then 30: 70 >= 60) and stops; the 12 MiB block stays.
    rows = [(A, 1, 40 * MiB), (A, 2, 30 * MiB), (A, 3, 12 * MiB), (F, 1, 0), (F, 2, 0), (F, 3, 0), (A, 4, 60 * MiB)]
    r = run(rows, "max_split_size_mb:20", capacity=100 * MiB)
    assert (r.final_reserved, r.num_alloc_retries) == (72 * MiB, 0)


# ---------------------------------------------------------------- out of memory


def test_oom_retry_releases_cached_segments():
    # 24 MiB cached in two free 12 MiB segments; 30 MiB does not fit next to them in 40 MiB,
    # release_cached_blocks frees both and the retry succeeds where a no-retry model fails.
    rows = [(A, 1, 12 * MiB), (A, 2, 12 * MiB), (F, 1, 0), (F, 2, 0), (A, 3, 30 * MiB)]
    r = run(rows, capacity=40 * MiB)
    assert r.oom is None
    assert (r.final_reserved, r.num_alloc_retries, r.peak_reserved) == (30 * MiB, 1, 30 * MiB)


def test_oom_reports_where_and_what():
    rows = [(A, 1, 12 * MiB), (A, 2, 12 * MiB), (F, 1, 0), (A, 3, 30 * MiB), (F, 2, 0)]
    r = run(rows, capacity=40 * MiB)
    # The retry released the free 12 MiB segment; 12 + 30 > 40 still.
    assert r.oom is not None
    assert (r.oom.event_index, r.oom.requested_size, r.oom.alloc_size) == (3, 30 * MiB, 30 * MiB)
    assert (r.oom.reserved, r.oom.allocated) == (12 * MiB, 12 * MiB)
    assert r.events_replayed == 3


def test_oom_with_fraction_limit():
    r = run([(A, 1, 12 * MiB), (A, 2, 12 * MiB)], memory_fraction_limit=20 * MiB)
    assert r.oom is not None and r.oom.event_index == 1


def test_per_process_memory_fraction_key_caps_the_device():
    # 0.5 x 40 MiB = 20 MiB allowed: the second 12 MiB segment does not fit.
    r = run([(A, 1, 12 * MiB), (A, 2, 12 * MiB)], "per_process_memory_fraction:0.5", capacity=40 * MiB)
    assert r.oom is not None and r.oom.event_index == 1
    assert run([(A, 1, 12 * MiB), (A, 2, 12 * MiB)], capacity=40 * MiB).oom is None


def test_no_capacity_no_oom():
    assert run([(A, i, 80 * 1024 * MiB) for i in range(4)]).oom is None


# ---------------------------------------------------------------- garbage_collection_threshold


def test_garbage_collection_frees_old_cached_segments_first():
    # Limit 100 MiB, threshold 0.5 -> collect above 50 MiB. Cached: A 30 MiB (freed after the
    # 1st get_free_block call, age 2) and B 40 MiB (after the 2nd, age 1); at C's call the average
    # age is 1.5, so only A goes (30 MiB >= the 20 MiB target) and C gets a new 44 MiB segment.
    rows = [(A, 1, 30 * MiB), (F, 1, 0), (A, 2, 40 * MiB), (F, 2, 0), (A, 3, 44 * MiB)]
    r = run(rows, "garbage_collection_threshold:0.5", memory_fraction_limit=100 * MiB)
    assert (r.final_reserved, r.num_alloc_retries) == (84 * MiB, 0)
    # Without collection 70 + 44 > 100: the OOM path empties the whole cache and retries.
    r = run(rows, memory_fraction_limit=100 * MiB)
    assert (r.final_reserved, r.num_alloc_retries) == (44 * MiB, 1)


def test_garbage_collection_needs_a_memory_fraction():
    rows = [(A, 1, 30 * MiB), (F, 1, 0), (A, 2, 40 * MiB), (F, 2, 0), (A, 3, 44 * MiB)]
    assert run(rows, "garbage_collection_threshold:0.5").final_reserved == 114 * MiB


# ---------------------------------------------------------------- expandable segments

ES = "expandable_segments:True"


def test_expandable_maps_pages():
    assert run([(A, 1, KiB)], ES).peak_reserved == 2 * MiB  # small pool: 2 MiB pages
    assert run([(A, 1, 5 * MiB)], ES).peak_reserved == 20 * MiB  # large pool: 20 MiB pages
    assert run([(A, 1, 30 * MiB)], ES).peak_reserved == 40 * MiB


def test_large_segment_size():
    # torch 2.13's large_segment_size_mb replaces kLargeBuffer for 1-10 MiB requests and as the
    # large pool's expandable page.
    assert run([(A, 1, 5 * MiB)], "large_segment_size_mb:64").peak_reserved == 64 * MiB
    assert run([(A, 1, 30 * MiB)], "large_segment_size_mb:64").peak_reserved == 30 * MiB
    assert run([(A, 1, 30 * MiB)], ES + ",large_segment_size_mb:64").peak_reserved == 64 * MiB


def test_expandable_segment_grows_in_place():
    # 30 MiB maps 40 MiB (30 used, 10 free at the end); the next 30 MiB takes the free 10 MiB
    # plus one more 20 MiB page of the same segment.
    r = run([(A, 1, 30 * MiB), (A, 2, 30 * MiB)], ES)
    assert (r.final_reserved, r.final_segments, r.final_allocated) == (60 * MiB, 1, 60 * MiB)


def test_expandable_avoids_growing_size_fragmentation():
    # A tensor that grows a little each step: without expandable segments every size needs a new
    # cudaMalloc (the cached 30 MiB cannot hold 32 MiB); with them the mapped 40 MiB is reused.
    rows = [(A, 1, 30 * MiB), (F, 1, 0), (A, 2, 32 * MiB)]
    assert run(rows).peak_reserved == 62 * MiB
    r = run(rows, ES)
    assert r.peak_reserved == 40 * MiB
    assert r.fragmentation_at_peak == 10 * MiB  # 30 MiB allocated, 10 MiB free in the first page pair


def test_expandable_oom_retry_unmaps_free_pages():
    # Stream 0 leaves 40 MiB mapped and free; stream 1's 30 MiB cannot map 40 more under 60 MiB,
    # release_cached_blocks unmaps stream 0's pages and the retry maps 40 MiB for stream 1.
    rows = [(A, 1, 30 * MiB, 0), (F, 1, 0, 0), (A, 2, 30 * MiB, 1)]
    r = run(rows, ES, capacity=60 * MiB)
    assert r.oom is None
    assert (r.final_reserved, r.num_alloc_retries, r.final_segments) == (40 * MiB, 1, 1)
    assert run(rows, ES, capacity=39 * MiB).oom.event_index == 0


def test_expandable_empty_cache_returns_only_whole_free_pages():
    m = CachingAllocatorModel(parse_alloc_conf(ES))
    a = m.malloc(30 * MiB)
    b = m.malloc(5 * MiB)  # 30..35 MiB, in the second page
    m.free(a)
    m.empty_cache()
    # Page 0 (0..20 MiB) is wholly free and unmapped; page 1 holds b.
    assert (m.reserved, m.allocated) == (20 * MiB, 5 * MiB)
    m.free(b)
    m.empty_cache()
    assert (m.reserved, m.segments) == (0, 0)


# ---------------------------------------------------------------- config parsing


def test_parse_full_conf():
    cfg = parse_alloc_conf(
        "expandable_segments:True,max_split_size_mb:128,roundup_power2_divisions:4,garbage_collection_threshold:0.8"
    )
    assert cfg == AllocatorConfig(
        max_split_size=128 * MiB,
        roundup_power2_divisions=(4,) * 16,
        garbage_collection_threshold=0.8,
        expandable_segments=True,
    )
    assert parse_alloc_conf("") == AllocatorConfig()
    assert parse_alloc_conf(" expandable_segments : False ") == AllocatorConfig()
    assert parse_alloc_conf("expandable_segments:true").expandable_segments
    # Host-side and locking options parse and change nothing on the device.
    assert (
        parse_alloc_conf(
            "pinned_use_background_threads:True,pinned_num_register_threads:8,"
            "release_lock_on_cudamalloc:True,backend:native"
        )
        == AllocatorConfig()
    )


def test_parse_divisions_per_interval():
    # parseRoundUpPower2Divisions: the first entry (256 MiB = interval 8) also fills the intervals
    # below it; '>' fills from the last interval given (9, 512 MiB), that one included.
    cfg = parse_alloc_conf("roundup_power2_divisions:[256:1,512:2,>:8]")
    assert cfg.roundup_power2_divisions == (1,) * 9 + (8,) * 7
    assert cfg.divisions_for(300 * MiB) == 1
    assert cfg.divisions_for(2 * 1024 * MiB) == 8


@pytest.mark.parametrize(
    "text, key",
    [
        ("max_split_size_mb:10", "max_split_size_mb"),
        ("max_split_size_mb:lots", "max_split_size_mb"),
        ("foo:1", "foo"),
        ("expandable_segments:yes", "expandable_segments"),
        ("garbage_collection_threshold:1.5", "garbage_collection_threshold"),
        ("roundup_power2_divisions:3", "roundup_power2_divisions"),
        ("backend:cudaMallocAsync", "backend"),
        ("max_split_size_mb", "max_split_size_mb"),
        ("large_segment_size_mb:10", "large_segment_size_mb"),
        ("per_process_memory_fraction:0", "per_process_memory_fraction"),
        ("expandable_segments:True;max_split_size_mb:64", "expandable_segments"),
    ],
)
def test_parse_errors_name_the_key(text, key):
    with pytest.raises(VramplanError) as err:
        parse_alloc_conf(text)
    message = str(err.value)
    assert key in message and "\n" not in message and message.startswith("PYTORCH_CUDA_ALLOC_CONF")


# ---------------------------------------------------------------- events and replay


def test_repeat_shifts_tensor_ids():
    block = EventStream.from_tuples([(A, 0, 5 * MiB), (A, 1, MiB), (F, 1, 0)])
    ev = block.repeat(3)
    assert ev.ids.tolist() == [0, 1, 1, 2, 3, 3, 4, 5, 5]
    assert ev.sizes.tolist() == [5 * MiB, MiB, 0] * 3
    r = replay(ev)
    # Three live 5 MiB tensors: one 20 MiB segment split three ways; 1 MiB ones in a 2 MiB segment.
    assert (r.final_allocated, r.final_reserved) == (15 * MiB, 22 * MiB)


def test_reserved_trace_per_event():
    r = run([(A, 1, KiB), (A, 2, 5 * MiB), (F, 2, 0)], record_trace=True)
    assert r.reserved_trace.tolist() == [2 * MiB, 22 * MiB, 22 * MiB]
    assert r.allocated_trace.tolist() == [KiB, KiB + 5 * MiB, KiB]


def test_bad_event_streams():
    with pytest.raises(VramplanError, match="freed but not allocated"):
        run([(F, 1, 0)])
    with pytest.raises(VramplanError, match="allocated twice"):
        run([(A, 1, 512), (A, 1, 512)])


def test_zero_size_takes_no_memory():
    r = run([(A, 1, 0), (F, 1, 0)])
    assert (r.peak_reserved, r.final_segments) == (0, 0)


sizes = st.one_of(st.integers(0, 2 * MiB), st.integers(MiB, 64 * MiB))
confs = st.sampled_from(
    ["", ES, "max_split_size_mb:20", "roundup_power2_divisions:4", "max_split_size_mb:32,expandable_segments:True"]
)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(sizes, st.integers(0, 1), st.booleans()), min_size=1, max_size=60), confs)
def test_properties(allocs, conf):
    # Interleave: each tensor is freed right away or at the end, on one of two streams.
    rows, kept = [], []
    for tid, (size, stream, keep) in enumerate(allocs):
        rows.append((A, tid, size, stream))
        if keep:
            kept.append((tid, stream))
        else:
            rows.append((F, tid, 0, stream))
    rows += [(F, tid, 0, stream) for tid, stream in kept]
    r = run(rows, conf, record_trace=True)
    assert r.oom is None  # unlimited capacity
    assert np.all(r.reserved_trace >= r.allocated_trace)
    assert r.final_allocated == 0
    assert r.peak_allocated >= r.peak_requested > 0 or all(s == 0 for s, _, _ in allocs)
    assert r.fragmentation_at_peak >= 0
    # Emptying the cache at the end returns every byte (no live blocks).
    model = CachingAllocatorModel(parse_alloc_conf(conf))
    live = {}
    for op, tid, size, stream in rows:
        if op == A:
            live[tid] = model.malloc(size, stream) if size else None
        elif live[tid] is not None:
            model.free(live.pop(tid))
    model.empty_cache()
    assert (model.reserved, model.allocated, model.segments) == (0, 0, 0)


# ---------------------------------------------------------------- a recorded stream (cputrace)


def test_events_from_a_cpu_trace():
    torch = pytest.importorskip("torch")
    from vramplan.verify.allocstream import events_from_trace
    from vramplan.verify.cputrace import AllocationTrace

    with AllocationTrace() as trace:
        with trace.phase("forward", 0):
            a = torch.empty(256, dtype=torch.float32)  # 1 KiB
            b = torch.empty(5 * MiB, dtype=torch.uint8)
            del a
        with trace.phase("backward", 0):
            c = torch.empty(6 * MiB, dtype=torch.uint8)
            del b, c
    rec = events_from_trace(trace)
    ev = rec.events
    allocs = ev.sizes[ev.ops == Op.ALLOC].tolist()
    assert allocs == [KiB, 5 * MiB, 6 * MiB]
    assert int((ev.ops == Op.FREE).sum()) == 3
    assert [p[0] for p in rec.phases] == ["forward#0", "backward#0"]
    fwd, bwd = rec.phases
    assert (fwd[1], fwd[2]) == (0, 3) and (bwd[1], bwd[2]) == (3, 6)
    r = replay(ev)
    # 1 KiB: one 2 MiB small segment; 5 MiB: a 20 MiB segment whose 15 MiB rest holds the 6 MiB.
    assert (r.peak_reserved, r.final_allocated) == (22 * MiB, 0)


def test_sequence_script_refuses_an_unknown_case_in_one_line(tmp_path, capsys):
    """scripts/sequence_reserved.py (issue 18's in-order re-measurement): a --from-case that is
    not a dev case is one line naming the flag, exit 2, nothing written."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import sequence_reserved

    out = tmp_path / "s.jsonl"
    assert sequence_reserved.main(["--out", str(out), "--from-case", "nope", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("--from-case: 'nope'") and not out.exists()
