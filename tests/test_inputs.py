"""Issue 17: every input answered in one line. One group per class of bad input; each test
failed before its boundary was built (a traceback, a hang, a crash inside transformers, or
exit 0 on nonsense). The fuzzing of the same boundaries is tests/test_fuzz.py."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vramplan
from vramplan.cli import main
from vramplan.errors import VramplanError

TINY = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=4096,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    rms_norm_eps=1e-5,
    hidden_act="silu",
)
EST = ["estimate", "llama-3.2-1b", "--gpus", "24GB"]


def one_line(capsys, argv: list[str], *names: str, code: int = 2) -> str:
    """main(argv) ends with ``code`` and exactly one stderr line naming each of ``names``."""
    rc = main(argv)
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert rc == code, (rc, out.err[-2000:])
    assert len(lines) == 1 and "Traceback" not in out.err, out.err[-2000:]
    assert lines[0].startswith("vramplan: "), lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def _config(tmp_path: Path, name: str = "m", **changes) -> str:
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({**TINY, **changes}))
    return str(d / "config.json")


# ---------------------------------------------------------------- 1. numbers past any real size

NINES = "9" * 400


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["estimate", "llama-3.2-1b", "--gpus", NINES + "GB"], "--gpus"),
        ([*EST, "--host-ram", NINES + "GB"], "--host-ram"),
        (["estimate", "llama-3.2-1b", "--gpus", "9" * 5000 + "x24GB"], "--gpus"),
        ([*EST, "--method", "full", "--batch-size", "9223372036854775808"], "--batch-size"),
        ([*EST, "--method", "full", "--seq-len", str(10**30)], "--seq-len"),
        ([*EST, "--method", "full", "--seq-len", "9" * 5000], "--seq-len"),
        ([*EST, "--method", "lora", "--lora-r", str(10**9)], "--lora-r"),
        ([*EST, "--method", "full", "--fsdp", str(10**6)], "--fsdp"),
        ([*EST, "--method", "full", "--num-layers", "5000"], "--num-layers"),
        ([*EST, "--method", "full", "--gradient-accumulation", str(10**9)], "--gradient-accumulation"),
        ([*EST, "--method", "full", "--batch-size", "65536", "--seq-len", "65536"], "--batch-size"),
        (["plan", "llama-3.2-1b", "--gpus", "24GB", "--max-batch", "1000000000"], "--max-batch"),
        (["plan", "llama-3.2-1b", "--gpus", "24GB", "--top", str(10**12)], "--top"),
        (["plan", "llama-3.2-1b", "--gpus", "24GB", "--global-batch", str(10**40)], "--global-batch"),
        (["verify", "llama-3.2-1b", "--steps", str(10**9)], "--steps"),
    ],
)
def test_numbers_past_any_real_size_are_refused_with_the_limit(capsys, argv, flag):
    line = one_line(capsys, argv, flag)
    assert "at most" in line or "limit" in line


def test_setup_model_bounds_the_same_numbers():
    from vramplan.estimate import make_setup
    from vramplan.setup import TrainingSetup

    for bad in (dict(seq_len=10**30), dict(batch_size=2**40), dict(galore_update_proj_gap=0), dict(lora_r=True)):
        with pytest.raises(VramplanError):
            make_setup(**bad)
        with pytest.raises(ValueError):  # pydantic's ValidationError around the same VramplanError
            TrainingSetup(**bad)


# ---------------------------------------------------------------- 2. config files


@pytest.mark.parametrize(
    "changes,key",
    [
        (dict(num_attention_heads=0), "num_attention_heads"),
        (dict(num_key_value_heads=0), "num_key_value_heads"),
        (dict(hidden_size=-256), "hidden_size"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(hidden_size=256.5), "hidden_size"),
        (dict(hidden_size="256"), "hidden_size"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(intermediate_size=0), "intermediate_size"),
        (dict(num_hidden_layers=100_000), "num_hidden_layers"),
        (dict(max_position_embeddings="abc"), "max_position_embeddings"),
        (dict(max_position_embeddings=-5), "max_position_embeddings"),
        (dict(text_config=None), "text_config"),
        (dict(hidden_size=250), "hidden_size"),  # 8 heads do not divide 250
        (dict(num_key_value_heads=3), "num_key_value_heads"),  # 3 does not divide 8 heads
        (dict(vocab_size=True), "vocab_size"),
    ],
)
@pytest.mark.parametrize("command", ["estimate", "plan"])
def test_config_fields_are_checked_naming_file_and_key(capsys, tmp_path, changes, key, command):
    path = _config(tmp_path, **changes)
    argv = [command, path, "--gpus", "24GB"] + (["--method", "lora"] if command == "estimate" else [])
    one_line(capsys, argv, "MODEL", path, key)


def test_nan_and_deep_nesting_in_a_config_are_one_line(capsys, tmp_path):
    nan = tmp_path / "nan.json"
    nan.write_text(json.dumps(TINY)[:-1] + ', "hidden_size": NaN}')
    one_line(capsys, ["estimate", str(nan), "--gpus", "24GB"], "NaN")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    one_line(capsys, ["estimate", str(deep), "--gpus", "24GB"], "nested")


# ---------------------------------------------------------------- 3. special files as MODEL


def test_special_files_are_not_read(capsys, tmp_path):
    one_line(capsys, ["estimate", "/dev/zero", "--gpus", "24GB"], "character device")
    one_line(capsys, ["estimate", "/dev/null", "--gpus", "24GB"], "character device")
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    started = time.monotonic()
    one_line(capsys, ["estimate", str(fifo), "--gpus", "24GB"], "named pipe")
    assert time.monotonic() - started < 10  # not blocked on open()
    one_line(capsys, ["estimate", "", "--gpus", "24GB"], "MODEL")
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(17 * 2**20)  # sparse: its size, not its reading, is refused
    one_line(capsys, ["estimate", str(big), "--gpus", "24GB"], "above the limit")


# ---------------------------------------------------------------- 4. work that explodes


def test_plot_values_are_bounded(capsys, tmp_path):
    values = ",".join(str(v) for v in range(1, 5001))
    one_line(
        capsys,
        ["plot", "scaling", "llama-3.2-1b", "--gpus", "24GB", "--values", values, "-o", str(tmp_path / "s.png")],
        "--values",
        "at most",
    )


def test_verify_on_the_cpu_checks_the_ram_it_needs_first(capsys, monkeypatch):
    import vramplan.verify.api as api

    monkeypatch.setattr(api, "available_ram", lambda: 2**30)
    monkeypatch.setattr("vramplan.verify.measure.run_case", lambda *a, **k: pytest.fail("the step ran"))
    line = one_line(
        capsys,
        ["verify", "llama-3.2-1b", "--device", "cpu", "--num-layers", "1", "--seq-len", "4096", "--no-progress"],
        "--device cpu",
        "GiB",
    )
    assert "available" in line


# ---------------------------------------------------------------- 5. output that cannot be written


def test_plot_output_is_checked_before_the_work(capsys, tmp_path):
    (tmp_path / "x.png").mkdir()
    one_line(
        capsys,
        ["plot", "breakdown", "llama-3.2-1b", "--gpus", "24GB", "-o", str(tmp_path / "x.png")],
        "-o",
        "directory",
    )
    one_line(capsys, ["plot", "breakdown", "llama-3.2-1b", "--gpus", "24GB", "-o", "/proc/x.png"], "-o")
    afile = tmp_path / "f"
    afile.write_text("")
    one_line(capsys, ["plot", "breakdown", "llama-3.2-1b", "--gpus", "24GB", "-o", str(afile / "x.png")], "-o")


def test_verify_out_is_checked_before_the_run(capsys, tmp_path, monkeypatch):
    import vramplan.verify.api as api

    monkeypatch.setattr(api, "verify", lambda *a, **k: pytest.fail("ran before checking --out"))
    afile = tmp_path / "report"
    afile.write_text("")
    one_line(capsys, ["verify", "llama-3.2-1b", "--device", "cpu", "--out", str(afile)], "--out")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("")
    one_line(capsys, ["verify", "llama-3.2-1b", "--device", "cpu", "--out", str(full)], "--out", "not empty")


def test_files_are_written_whole_or_not_at_all_with_the_umask(tmp_path, monkeypatch):
    from vramplan.files import write_file, write_folder

    old = os.umask(0o022)
    try:
        path = write_file(tmp_path / "a.txt", b"x", "-o")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644  # mkstemp's 0600 is not the user's choice
        folder = write_folder(tmp_path / "rep", {"report.json": b"{}"}, "--out")
        assert stat.S_IMODE(os.stat(folder / "report.json").st_mode) == 0o644
    finally:
        os.umask(old)

    def full_disk(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(VramplanError, match="No space left"):
        write_folder(tmp_path / "rep2", {"report.json": b"{}"}, "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "rep"]  # no half folder, no temp left


# ---------------------------------------------------------------- 6. streams


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(vramplan.__file__).parent.parent)}
    return subprocess.Popen([sys.executable, "-m", "vramplan.cli", *args], env=env, **kw)


def test_a_closed_pipe_exits_141_quietly():
    p = _cli("hardware", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before anything is written (`| head -0`)
    err = p.stderr.read().decode()
    assert p.wait(60) == 141 and err == ""


def test_a_full_disk_on_stdout_exits_120_in_one_line():
    with open("/dev/full", "w") as full:
        p = _cli(*EST, "--method", "full", "--format", "json", stdout=full, stderr=subprocess.PIPE)
        err = p.communicate(timeout=60)[1].decode()
    assert p.returncode == 120
    assert len(err.strip().splitlines()) == 1 and "No space left" in err and "Traceback" not in err


def test_ctrl_c_exits_130_without_a_traceback():
    p = _cli(
        *EST,
        "--method",
        "full",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # among the imports main makes (numpy's extension mapped), where the issue saw a
    # KeyboardInterrupt traceback; a fixed 0.3 s could land, on a loaded machine, in the
    # interpreter's own start-up, before main exists to answer it
    maps = Path(f"/proc/{p.pid}/maps")
    deadline = time.monotonic() + 60
    while p.poll() is None and time.monotonic() < deadline:
        if "_multiarray_umath" in maps.read_text(errors="replace"):
            break
        time.sleep(0.005)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1].decode()
    assert p.returncode in (130, -signal.SIGINT, 0) and "Traceback" not in err, err


def test_the_entry_point_imports_nothing_heavy_before_main():
    """main holds the process before numpy/pydantic load: their import window is inside its try."""
    code = "import sys, vramplan.cli; print(sorted(m for m in ('numpy', 'pydantic', 'torch') if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(Path(vramplan.__file__).parent.parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60).stdout
    assert out.strip() == "[]"


def test_keyboard_interrupt_in_a_command_is_130(monkeypatch, capsys):
    import vramplan.cli.hardware as hw

    def interrupted(_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(hw, "run", interrupted)
    assert main(["hardware"]) == 130 and capsys.readouterr().err == ""


# ---------------------------------------------------------------- 7. silent conflicts


@pytest.mark.parametrize(
    "argv,flag",
    [
        ([*EST, "--method", "full", "--lora-r", "64"], "--lora-r"),
        ([*EST, "--method", "lora", "--galore-rank", "64"], "--galore-rank"),
        ([*EST, "--method", "galore", "--lora-dropout", "0.1"], "--lora-dropout"),
        ([*EST, "--method", "full", "--lora-targets", "attention"], "--lora-targets"),
        ([*EST, "--method", "lora", "--quant", "nf4"], "--quant"),
        (["verify", "llama-3.2-1b", "--lora-r", "8", "--device", "cpu"], "--lora-r"),
    ],
)
def test_an_option_the_method_does_not_read_is_an_error_naming_both(capsys, argv, flag):
    one_line(capsys, argv, flag, "--method")


def test_the_comparison_still_applies_shared_options_where_they_belong(capsys):
    assert main([*EST, "--lora-dropout", "0.1", "--format", "json"]) == 0
    capsys.readouterr()


# ---------------------------------------------------------------- 8. messages that blame the wrong thing


def test_a_zero_width_is_blamed_on_the_config_not_a_flag(capsys, tmp_path):
    line = one_line(
        capsys, ["estimate", _config(tmp_path, hidden_size=0), "--gpus", "24GB", "--method", "lora"], "hidden_size"
    )
    assert "--lora-r" not in line


def test_an_error_about_config_b_names_config_b(capsys, tmp_path):
    a, b = _config(tmp_path, "a"), _config(tmp_path, "b")  # the same config: one cached analysis
    assert main(["estimate", a, "--gpus", "24GB", "--method", "full"]) == 0
    capsys.readouterr()
    line = one_line(
        capsys, ["estimate", b, "--gpus", "24GB", "--method", "full", "--num-layers", "5"], "--num-layers", b
    )
    assert a not in line


def test_plot_accuracy_names_the_file_and_case_not_flags_it_lacks(capsys, tmp_path):
    case = {
        "name": "c1",
        "model": "no-such-model",
        "method": "full",
        "batch": 1,
        "seq": 64,
        "layers": None,
        "ckpt": False,
        "optim": "adamw",
        "param_dtype": "bf16",
        "peak_alloc_mb": 100.0,
    }
    f = tmp_path / "cases.jsonl"
    f.write_text(json.dumps(case) + "\n")
    rc = main(["plot", "accuracy", str(f), "-o", str(tmp_path / "a.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "FILE" in err
    assert "--method" not in err and "--batch-size" not in err


def test_a_bare_host_ram_needs_a_unit(capsys):
    one_line(capsys, [*EST, "--host-ram", "128"], "--host-ram", "unit")


# ---------------------------------------------------------------- 9. the Python API


def test_api_host_ram_takes_a_size_everywhere():
    est = vramplan.estimate("llama-3.2-1b", gpus="24GB", method="lora", host_ram="128GB")
    assert est.host_ram_available_bytes == 128 * 2**30
    fig = vramplan.plot_breakdown("llama-3.2-1b", gpus="24GB", method="lora", host_ram="1GB")
    import matplotlib.pyplot as plt

    plt.close(fig)


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(gpus=24), "gpus"),
        (dict(gpus="24GB", host_ram=-5), "host_ram"),
        (dict(gpus="24GB", host_ram=0), "host_ram"),
        (dict(gpus="24GB", method="galore", galore_update_proj_gap=0), "galore_update_proj_gap"),
        (dict(gpus="24GB", method="galore", galore_update_proj_gap=-5), "galore_update_proj_gap"),
        (dict(gpus="24GB", method="full", lora_r=64), "lora_r"),
        (dict(gpus="24GB", method="full", batch_size=True), "batch_size"),
        (dict(gpus="24GB", method="full", no_such_field=1), "no_such_field"),
    ],
)
def test_api_errors_are_vramplan_errors_naming_the_argument(kwargs, argument):
    with pytest.raises(VramplanError) as e:
        vramplan.estimate("llama-3.2-1b", **kwargs)
    assert isinstance(e.value, ValueError) and e.value.flag == argument


def test_api_model_of_a_wrong_type_is_named():
    for fn in (vramplan.estimate, vramplan.plan, vramplan.load_model):
        with pytest.raises(VramplanError) as e:
            fn(123, gpus="24GB") if fn is not vramplan.load_model else fn(123)
        assert e.value.flag == "model"


# ---------------------------------------------------------------- 10. a leak


def test_the_shapes_cache_is_bounded():
    from vramplan import throughput
    from vramplan.model_loader import load_model_spec

    spec = load_model_spec("qwen2.5-0.5b")
    for _ in range(3 * throughput.SHAPES_CACHE_SIZE):
        throughput.shapes(spec.model_copy())
    assert len(throughput._SHAPES) <= throughput.SHAPES_CACHE_SIZE


# ---------------------------------------------------------------- 11. errors go to stderr


def test_gpus_without_a_gpu_says_so_on_stderr(capsys, monkeypatch):
    from vramplan import nvml

    def unavailable():
        raise nvml.NvmlUnavailable("no library")

    monkeypatch.setattr(nvml, "devices", unavailable)
    assert main(["gpus"]) == 1
    out = capsys.readouterr()
    assert out.out == "" and "no NVIDIA GPU" in out.err


# ---------------------------------------------------------------- 12. checkpointing and the peak


def test_checkpointing_costs_at_most_the_last_layers_input():
    """Gradient checkpointing can raise the peak, by the one hidden state the checkpoint of the
    last layer to run backward (layer 0) keeps: the embedding output, which without it nothing
    saves (Llama's RMSNorm saves an fp32 copy). test_checkpoint_keeps_layer_0s_input_traced
    measures it on the real step."""
    from vramplan.estimate import make_setup
    from vramplan.memory import step_model
    from vramplan.memory.storage import alloc
    from vramplan.model_loader import load_model_spec

    fields = dict(method="full", batch_size=28, seq_len=128, optim="adamw_torch_fused")
    plain = vramplan.estimate("llama-3.3-70b", gpus="48GB", **fields).per_gpu
    ckpt = vramplan.estimate("llama-3.3-70b", gpus="48GB", gradient_checkpointing=True, **fields).per_gpu
    hidden = alloc(28 * 128 * 8192 * 2)  # one bf16 hidden state of Llama 3.3 70B
    assert 0 <= ckpt.peak_allocated_bytes - plain.peak_allocated_bytes <= hidden
    # the moment it costs it at: layer 0's MLP backward (here just below the embedding's backward,
    # the peak, which holds the untied embedding's grad, made last)
    spec = load_model_spec("llama-3.3-70b")

    def layer0_mlp(**extra) -> int:
        phases = step_model(spec, make_setup(**fields, **extra)).phases
        return next(p.allocated for p in phases if p.name == "layer 0 backward (mlp)")

    assert layer0_mlp(gradient_checkpointing=True) - layer0_mlp() == hidden


@pytest.mark.cputrace
def test_checkpoint_keeps_layer_0s_input_traced(tmp_path):
    """The real step (CPU trace): a full fine-tune whose backward peak is the last layer's holds
    one more bf16 hidden state with checkpointing. Measured: +0.982 MiB for 1.000 MiB (the model
    says +1.000), so the rule stands and the issue's invariant is one hidden state, not zero."""
    from vramplan.estimate import make_setup
    from vramplan.verify.cputrace import trace_step

    cfg = dict(TINY, hidden_size=1024, intermediate_size=4096, vocab_size=64)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    peaks = {}
    for ckpt in (False, True):
        setup = make_setup(
            method="full", batch_size=4, seq_len=128, optim="adamw_torch_fused", gradient_checkpointing=ckpt
        )
        peaks[ckpt] = trace_step(str(tmp_path), setup).peak("backward", step=1)
    hidden = 4 * 128 * 1024 * 2
    assert abs((peaks[True] - peaks[False]) - hidden) < 0.05 * hidden


@pytest.mark.parametrize("text,tokens", [("32k", 32768), ("8K", 8192), ("4096", 4096)])
def test_a_sequence_length_may_be_written_in_k(text, tokens, capsys):
    """--seq-len 32k means 32,768 tokens, as context lengths are said; anything else is refused
    as before, naming the flag."""
    args = ["estimate", "llama-3.2-1b", "--gpus", "24GB", "--method", "lora", "--format", "json"]
    assert main([*args, "--seq-len", text]) == 0
    assert json.loads(capsys.readouterr().out)["setup"]["seq_len"] == tokens
    for bad in ("3.5k", "4096k", "k"):
        assert main([*args, "--seq-len", bad]) == 2
        assert "argument --seq-len:" in capsys.readouterr().err
