"""The largest value each count, size and token number may take, checked where it enters.

A bound here is not a claim about what trains: it keeps the arithmetic and the work of a
request finite (issue 17: a 10^30 sequence length printed 40-digit integers, a 10^9
micro-batch search ran numpy out of memory, 100,000 layers took 131 s). Each sits well
above anything released, so no real question is refused. The command-line types
(vramplan/cli/common.py), TrainingSetup, PlanRequest and the config.json check
(vramplan/model_loader.py) all read them from here; the help text of each flag states them.
"""

from __future__ import annotations

from vramplan.errors import VramplanError

# tokens in one sequence: 2^21 = 2,097,152, twice the longest context trained in one
# sequence by today's releases (1M: Qwen2.5-1M, Llama 4's 10M is reached by extrapolation)
MAX_SEQ_LEN = 2**21
# tokens in one micro-batch on one GPU (batch x seq): 2^24 = 16.8M; one bf16 hidden state of
# a 4096-wide model at that size is 128 GiB, past any GPU
MAX_TOKENS = 2**24
MAX_BATCH_SIZE = MAX_TOKENS  # sequences per micro-batch (bounded again by MAX_TOKENS)
MAX_RANK = 2**16  # LoRA / GaLore rank: past the widest Linear of any released model
MAX_LAYERS = 1024  # decoder layers (the deepest released LLM has 126: Llama 3.1 405B)
MAX_RANKS = 4096  # FSDP world size, nodes, GPUs per node (vramplan.hardware.MAX_GPU_COUNT)
MAX_ACCUMULATION = 2**16  # micro-batches per optimizer step
MAX_PROJ_GAP = 2**31 - 1  # steps between GaLore SVD refreshes
MAX_GLOBAL_BATCH = 2**24  # sequences per optimizer step over all GPUs
MAX_PLAN_BATCH = 1024  # plan --max-batch: the width of the searched grid (4x the default 256;
#                                      the search and its what-would-fit reruns scale with it)
MAX_TOP = 1000  # plan --top rows
MAX_PLOT_VALUES = 64  # plot scaling --values: one estimate per method per value
MAX_STEPS = 1000  # verify --steps (3 measure the step)
MAX_DEPTHS = 8  # verify --depths: truncated runs to extrapolate from

# config.json: the file, its nesting and the size of what it describes
MAX_CONFIG_BYTES = 16 * 2**20  # 16 MiB; a Hugging Face config.json is a few KiB
MAX_JSON_DEPTH = 64  # nesting of objects/arrays (configs nest 3 deep)
MAX_DATA_BYTES = 256 * 2**20  # measured-case JSON lines read by plot accuracy
MAX_WIDTH = 2**20  # hidden_size, intermediate_size, head_dim (widest released: 53,248)
MAX_VOCAB = 2**24  # vocab_size (largest released: 262,144, Gemma 3)
MAX_HEADS = 2**14  # attention heads, key-value heads
MAX_EXPERTS = 2**16  # experts per MoE layer
MAX_POSITIONS = 2**40  # max_position_embeddings (read as the context, capped at MAX_SEQ_LEN)


def check_int(value: object, flag: str, hi: int, lo: int = 1) -> int:
    """value as an int in [lo, hi], or a VramplanError naming ``flag`` and the range. A bool is
    not a number here (``batch_size=True`` is a mistake, not 1)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise VramplanError(f"must be an integer, got {value!r}", flag)
    if not lo <= value <= hi:
        return _out_of_range(value, flag, lo, hi)
    return value


def _out_of_range(value: int, flag: str, lo: int, hi: int):
    # str() of a 5,000-digit int raises in Python >= 3.11 (sys.int_info.str_digits_check_threshold)
    magnitude = f"about 10^{int(abs(value).bit_length() * 0.30103)}"
    shown = str(value) if abs(value) < 10**30 else ("-" if value < 0 else "") + magnitude
    if value < lo:
        raise VramplanError(f"must be at least {lo:,}, got {shown}", flag)
    raise VramplanError(f"must be at most {hi:,}, got {shown}", flag)
