"""Run by tests/test_launch.py in its own process (the flag it sets is process-wide).

One gloo rank set up as a launched CPU rank is (launch.init_distributed: one worker thread,
every thread's frees counted). Each round all-reduces a fresh 1 MiB tensor whose future has a
slow callback, so gloo's worker thread still holds the collective when the main thread has let
go of it, then settles and allocates a 4-byte marker, whose traced event reads the running total.
Prints the spread of those totals over the rounds: 0 when every round's tensor was freed before
its marker."""

import os
import socket
import sys
import time

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch._C._profiler import _EventType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from vramplan.verify import launch  # noqa: E402
from vramplan.verify.measure import settle_collectives  # noqa: E402

launch.init_distributed("cpu")
with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    for _ in range(int(sys.argv[1])):
        t = torch.ones(2**18)
        work = dist.all_reduce(t, async_op=True)
        work.get_future().then(lambda f: time.sleep(0.02))  # runs on the worker thread
        work.wait()
        del t, work
        settle_collectives()
        torch.empty(1)
totals, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
while stack:
    e = stack.pop()
    stack.extend(e.children)
    if e.typed[0] == _EventType.Allocation and e.typed[1].alloc_size == 4:
        totals.append(e.typed[1].total_allocated)
dist.destroy_process_group()
print(len(totals), max(totals) - min(totals), flush=True)
# Skip the interpreter's teardown: with Python callbacks left on gloo futures it aborted once in
# 16 runs here ("terminate called without an active exception"), after the result was printed.
os._exit(0)
