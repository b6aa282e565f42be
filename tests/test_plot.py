"""`vramplan plot`: each figure holds the series it should, files are real PNG/SVG, bad input is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vramplan import plot
from vramplan.categories import COLORS, Category
from vramplan.cli import main
from vramplan.estimate import estimate_config
from vramplan.hardware import parse_gpus
from vramplan.measured import load_cases
from vramplan.model_loader import load_model_spec
from vramplan.units import GiB

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = dict(model="llama-3.2-1b", num_layers=2)


@pytest.fixture(scope="module")
def tiny():
    return load_model_spec(TINY["model"], num_layers=TINY["num_layers"])


def _bar_widths(ax) -> list[float]:
    """Per-bar drawn length (GiB), summed over the category containers, top bar first."""
    totals: dict[float, float] = {}
    for container in ax.containers:
        for patch in container.patches:
            y = round(patch.get_y(), 3)
            totals[y] = totals.get(y, 0.0) + patch.get_width()
    return [totals[y] for y in sorted(totals, reverse=True)]


# ---------------------------------------------------------------- breakdown


def test_breakdown_draws_each_strategy_to_its_total(tiny):
    gpus = parse_gpus("1x24GB")
    bars = plot.breakdown_bars(tiny, gpus, {})
    fig = plot.breakdown_figure(bars)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [("* " if b.recommended else "") + b.label for b in bars]
    assert len(bars) >= 5 and any(b.recommended for b in bars)
    # nothing is cut on a 24 GB card for a 2-layer model: each bar is as long as its total
    for drawn, bar in zip(_bar_widths(ax), bars, strict=True):
        assert drawn == pytest.approx(bar.estimate.per_gpu.total_bytes / GiB, rel=1e-9)
    capacity = [l for l in ax.get_lines() if l.get_linestyle() == "--"]
    assert len(capacity) == 1 and capacity[0].get_xdata()[0] == pytest.approx(gpus.profile.memory_bytes / GiB)


def test_breakdown_colours_and_legend_follow_the_categories(tiny):
    bars = plot.breakdown_bars(tiny, parse_gpus("1x24GB"), {"method": "qlora", "gradient_checkpointing": True})
    fig = plot.breakdown_figure(bars)
    ax = fig.axes[0]
    present = {c for c in Category if bars[0].estimate.per_gpu.breakdown.get(c, 0)}
    assert Category.QUANT_STATE in present and Category.ADAPTERS in present
    by_label = {c.get_label(): c for c in ax.containers}
    assert set(by_label) == {c.label for c in present}
    for cat in present:
        assert by_label[cat.label].patches[0].get_facecolor()[:3] == pytest.approx(_rgb(COLORS[cat]))
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("capacity" in t for t in legend) and all(c.label in legend for c in present)


@pytest.mark.cputrace  # seconds each: many plans or estimates (the fast tier stays under 2 min)
def test_breakdown_verdicts_match_the_estimates():
    spec = load_model_spec("llama-2-70b")
    bars = plot.breakdown_bars(spec, parse_gpus("2x24GB"), {}, host_ram=128 * GiB)
    ax = plot.breakdown_figure(bars).axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == len(bars)
    for text, bar in zip(texts, bars, strict=True):
        est = bar.estimate
        assert text.startswith("fits") == est.fits
        assert ("host RAM short" in text) == (est.fits_gpu and not est.fits_host)
        assert f"{est.per_gpu.total_bytes / GiB:.1f} GiB" in text


@pytest.mark.cputrace  # seconds each: many plans or estimates (the fast tier stays under 2 min)
def test_breakdown_breaks_the_axis_for_bars_far_past_the_card():
    """A 70B full fine-tune needs 675 GiB per 24 GB card: drawn in one panel it showed only its
    weights. The axis breaks: every bar is drawn to its total, a right panel continues the long
    ones on their own scale (gradients and optimizer states visible), their verdicts end in an
    arrow, and what fits, or nearly, is in the left panel to scale."""
    spec = load_model_spec("llama-2-70b")
    gpus = parse_gpus("2x24GB")
    bars = plot.breakdown_bars(spec, gpus, {}, host_ram=128 * GiB)
    fig = plot.breakdown_figure(bars)
    ax, far = fig.axes[:2]
    cap = gpus.profile.memory_bytes / GiB
    left_end = ax.get_xlim()[1]
    assert (
        far.get_xlim()[0] == pytest.approx(left_end)
        and far.get_xlim()[1] > max(b.estimate.per_gpu.total_bytes for b in bars) / GiB
    )
    for drawn, bar, text in zip(_bar_widths(ax), bars, [t.get_text() for t in ax.texts], strict=True):
        total = bar.estimate.per_gpu.total_bytes / GiB
        assert drawn == pytest.approx(total)
        assert text.endswith("→") == (total > left_end)
        if total > 5 * cap:
            assert total > left_end  # e.g. the 675 GiB full fine-tune runs on into the right panel
        if total <= 1.2 * cap:
            assert total < left_end  # what fits, or nearly, is drawn to scale on the left
    full = bars[0].estimate.per_gpu.breakdown
    optim_start = sum(full.get(c, 0) for c in list(Category)[: list(Category).index(Category.OPTIMIZER_STATES)])
    assert far.get_xlim()[0] < optim_start / GiB < far.get_xlim()[1]  # the optimizer states are on the page


def test_one_configuration_is_never_cut():
    spec = load_model_spec("llama-2-70b")
    gpus = parse_gpus("1x8GB")
    bars = plot.breakdown_bars(spec, gpus, {"method": "full"}, host_ram=128 * GiB)
    total = bars[0].estimate.per_gpu.total_bytes
    assert total > 50 * gpus.profile.memory_bytes  # far past the card: several bars would be cut there
    fig = plot.breakdown_figure(bars)
    ax = fig.axes[0]
    assert _bar_widths(ax)[0] == pytest.approx(total / GiB)
    assert ax.get_xlim()[1] > total / GiB and len(fig.axes) == 1 and "→" not in ax.texts[0].get_text()


def test_empty_breakdown_is_an_error():
    with pytest.raises(Exception, match="nothing to plot"):
        plot.breakdown_figure([])


# ---------------------------------------------------------------- scaling


def test_scaling_series_grow_with_sequence_length(tiny):
    values = (256, 1024, 4096)
    series = plot.scaling_series(tiny, parse_gpus("rtx-4090"), ["full", "qlora"], "seq", values, {})
    assert [s.label.split()[0] for s in series] == ["full", "qlora"]
    for s in series:
        assert s.xs == values
        assert list(s.totals) == sorted(s.totals) and s.totals[0] < s.totals[-1]
    # the same numbers as estimating each point on its own
    direct = estimate_config(tiny, "rtx-4090", method="qlora", seq_len=1024).per_gpu.total_bytes
    assert series[1].totals[1] == direct


def test_scaling_optim_goes_to_the_methods_it_fits(tiny):
    series = plot.scaling_series(
        tiny, parse_gpus("rtx-4090"), ["full", "galore"], "batch", (1, 2), {"optim": "adamw_bnb_8bit", "seq_len": 512}
    )
    # GaLore keeps its own optimizer: the comparison's 8-bit layer-wise GaLore AdamW, not bnb's AdamW
    assert "8-bit" in series[0].label and series[1].label == "galore 8-bit layer-wise + ckpt"


def test_scaling_galore_is_the_comparisons_configuration(tiny):
    """The scaling plot drew plain GaLore (39 GiB for an 8B) next to a table comparing 8-bit
    layer-wise GaLore with recomputation (23 GiB): the same name, another configuration."""
    from vramplan.strategies import compare

    gpus = parse_gpus("rtx-4090")
    row = next(r for r in compare(tiny, gpus, {"seq_len": 512}) if r.label.startswith("GaLore"))
    series = plot.scaling_series(tiny, gpus, ["galore"], "seq", (512,), {})
    assert series[0].totals[0] == row.estimate.per_gpu.total_bytes


def test_scaling_figure_lines_capacities_and_fit_notes():
    s1 = plot.Series("full", (512, 1024, 2048), (10 * GiB, 20 * GiB, 40 * GiB))
    s2 = plot.Series("qlora nf4", (512, 1024, 2048), (2 * GiB, 3 * GiB, 5 * GiB))
    fig = plot.scaling_figure([s1, s2], "seq", [("rtx-4090", 24 * GiB), ("a100-80gb", 80 * GiB)])
    ax = fig.axes[0]
    lines = [l for l in ax.get_lines() if l.get_label().startswith(("full", "qlora"))]
    assert [list(l.get_ydata()) for l in lines] == [[10, 20, 40], [2, 3, 5]]
    assert "rtx-4090 \u2264 1024" in lines[0].get_label() and "a100-80gb all" in lines[0].get_label()
    assert "rtx-4090 all" in lines[1].get_label()
    caps = sorted(l.get_ydata()[0] for l in ax.get_lines() if l.get_label().startswith("capacity"))
    assert caps == [24, 80]
    # filled where it fits the first card, hollow where it does not
    faces = ax.collections[0].get_facecolors()
    assert [tuple(f[:3]) != (1.0, 1.0, 1.0) for f in faces] == [True, True, False]


def test_fit_limit():
    s = plot.Series("x", (1, 2, 4), (5, 9, 12))
    assert plot.fit_limit(s, 4) == "none"
    assert plot.fit_limit(s, 10) == "\u2264 2"
    assert plot.fit_limit(s, 12) == "all"


# ---------------------------------------------------------------- accuracy


def _cases(tmp_path, extra: dict | None = None, inflate: float | None = None):
    """Three measured H100 lines of presets; optionally one measurement scaled by ``inflate``."""
    lines = [json.loads(l) for l in (DATA / "h100_dev.jsonl").read_text().splitlines() if '"llama-3.2-1b"' in l][:3]
    if inflate:
        lines[2]["peak_alloc_mb"] *= inflate
    for line in lines:
        line.update(extra or {})
    path = tmp_path / "cases.jsonl"
    path.write_text("\n".join(json.dumps(l) for l in lines) + "\n")
    return path


def test_accuracy_one_point_per_case_and_outliers_named(tmp_path):
    cases = load_cases(_cases(tmp_path, inflate=1.25))
    points = plot.accuracy_points(cases)
    assert [p.name for p in points] == [c.name for c in cases]
    assert [p.measured for p in points] == [c.peak_alloc_bytes for c in cases]
    fig = plot.accuracy_figure(points)
    top, err = fig.axes
    assert sum(len(c.get_offsets()) for c in top.collections[1:]) == 3  # collections[0] is the band
    named = [t.get_text() for t in err.texts]
    assert len(named) == 1 and named[0].startswith(cases[2].name)
    assert "2 within \u00b15%" in top.get_title(loc="left")


def test_accuracy_per_category_uses_the_measured_breakdown(tmp_path):
    breakdown = {"weights": 3 * GiB, "activations": 2 * GiB, "gradients": 0}
    cases = load_cases(_cases(tmp_path, {"measured_breakdown": breakdown}))
    points = plot.accuracy_points(cases, per_category=True)
    assert {p.category for p in points} == {Category.WEIGHTS, Category.ACTIVATIONS}  # zero dropped
    assert all(p.measured == breakdown[p.category.value] for p in points)
    top = plot.accuracy_figure(points).axes[0]
    colours = {c.get_label().split(" (")[0]: c.get_facecolor()[0][:3] for c in top.collections[1:]}
    assert colours["weights"] == pytest.approx(_rgb(COLORS[Category.WEIGHTS]))


def test_accuracy_bad_breakdown_key_names_the_categories(tmp_path):
    cases = load_cases(_cases(tmp_path, {"measured_breakdown": {"weigths": 1}}))
    with pytest.raises(Exception, match="weigths.*activations"):
        plot.accuracy_points(cases, per_category=True)


def test_accuracy_model_from_configs_dir(tmp_path):
    from vramplan.accuracy import model_source
    from vramplan.measured import MeasuredCase

    def case(m):
        return MeasuredCase(name="c", model=m, method="full", param_dtype="bf16", optim="adamw", batch=1, seq=8)

    (tmp_path / "my-model.json").write_text("{}")
    assert model_source(case("my-model"), tmp_path) == str(tmp_path / "my-model.json")
    assert model_source(case("llama-3.2-1b"), tmp_path) == "llama-3.2-1b"
    assert model_source(case("llama-3.2-1b"), None) == "llama-3.2-1b"


# ---------------------------------------------------------------- files and the command line


def test_cli_breakdown_png(tmp_path, capsys):
    out = tmp_path / "b.png"
    assert main(["plot", "breakdown", "llama-3.2-1b", "--num-layers", "2", "--gpus", "1x24GB", "-o", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000
    assert str(out) in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["b.png"]  # no temporary left behind


def test_cli_scaling_svg_has_the_series(tmp_path):
    out = tmp_path / "s.svg"
    assert (
        main(
            [
                "plot",
                "scaling",
                "llama-3.2-1b",
                "--num-layers",
                "2",
                "--gpus",
                "rtx-4090,a100-80gb",
                "--method",
                "full",
                "--method",
                "lora",
                "--values",
                "256,512",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    text = out.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    # matplotlib writes each text as glyph paths with the string in a comment
    for label in ("full", "lora", "capacity rtx-4090", "capacity a100-80gb"):
        assert label in text


def test_cli_accuracy_with_configs(tmp_path):
    out = tmp_path / "a.png"
    assert main(["plot", "accuracy", str(_cases(tmp_path)), "--configs", str(DATA / "configs"), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_default_file_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["plot", "breakdown", "llama-3.2-1b", "--num-layers", "2", "--gpus", "1x24GB", "--method", "lora"]) == 0
    assert (tmp_path / "breakdown-llama-3.2-1b-1x24GB.png").read_bytes()[:8] == PNG_MAGIC


def test_slug_of_a_config_path():
    assert plot.file_slug("/tmp/x/my model/config.json") == "my_model"
    assert plot.file_slug("/tmp/x/qwen.json") == "qwen"


def test_save_failure_leaves_no_file(tmp_path, tiny):
    fig = plot.breakdown_figure(plot.breakdown_bars(tiny, parse_gpus("1x24GB"), {"method": "full"}))

    def boom(*a, **k):
        raise RuntimeError("disk full")

    fig.savefig = boom
    with pytest.raises(RuntimeError):
        plot.save_figure(fig, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args,flag",
    [
        (["breakdown", "llama-3.2-1b", "--gpus", "1x24GB", "-o", "x.pdf"], "-o"),
        (["breakdown", "llama-3.2-1b", "--gpus", "1x24GB", "-o", "/no/such/dir/x.png"], "-o"),
        (["scaling", "llama-3.2-1b", "--gpus", "1x24GB", "--values", "512,big"], "--values"),
        (["scaling", "llama-3.2-1b", "--gpus", "1x24GB", "--values", "0,512"], "--values"),
        (["scaling", "llama-3.2-1b", "--gpus", "1x24GB", "--x", "tokens"], "--x"),
        (["scaling", "llama-3.2-1b", "--gpus", "1x24GB", "--method", "sgd"], "--method"),
        (["scaling", "llama-3.2-1b", "--gpus", "1x24GB,9xnope"], "--gpus"),
        (["accuracy", "no-such-file.jsonl"], "FILE"),
        (["accuracy", str(DATA / "README.md")], "FILE"),
        (["accuracy", str(DATA / "h100_dev.jsonl"), "--configs", "/no/such/dir"], "--configs"),
    ],
)
def test_bad_input_is_one_line(args, flag, tmp_path):
    # run in an empty directory (nothing may be written there) on this checkout's package
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "vramplan", "plot", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr
    assert flag in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_estimate_cli_does_not_import_matplotlib():
    code = "import sys, vramplan.cli as c; c.build_parser(); print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_api_plot_breakdown(tmp_path):
    import vramplan

    fig = vramplan.plot_breakdown("llama-3.2-1b", "1x24GB", path=tmp_path / "x.svg", num_layers=2, method="lora")
    assert (tmp_path / "x.svg").read_text().lstrip().startswith("<?xml")
    assert len(fig.axes[0].containers) >= 3


def _rgb(hex_colour: str) -> tuple[float, float, float]:
    h = hex_colour.lstrip("#")
    return tuple(int(h[i : i + 2], 16) / 255 for i in (0, 2, 4))


def test_scaling_switches_to_log_when_a_method_dwarfs_the_cards():
    near = plot.Series("lora", (1, 2), (10 * GiB, 20 * GiB))
    far = plot.Series("full", (1, 2), (100 * GiB, 900 * GiB))
    caps = [("rtx-4090", 24 * GiB)]
    assert plot.scaling_figure([near], "batch", caps).axes[0].get_yscale() == "linear"
    ax = plot.scaling_figure([near, far], "batch", caps).axes[0]
    assert ax.get_yscale() == "log" and ax.get_ylim()[1] >= 900  # nothing drawn off the chart


def test_timeline_bins_keep_the_step_peak():
    """A step of thousands of events drawn ~1500 points wide keeps, per bin, the event with the
    most bytes alive: the loss backward's peak, one event wide, must not vanish from the figure."""
    import numpy as np

    from vramplan.categories import Category
    from vramplan.plot import TIMELINE_BINS, Timeline, _peak_bins

    n = 10 * TIMELINE_BINS + 3
    weights, acts = np.full(n, 100), np.zeros(n, dtype=np.int64)
    acts[4321] = 5000  # a spike one event wide
    t = Timeline(
        live={Category.WEIGHTS: weights, Category.ACTIVATIONS: acts},
        reserved=np.arange(n),
        moments=[],
        capacity=10**6,
        title="t",
    )
    x, live, reserved = _peak_bins(t)
    assert len(x) <= TIMELINE_BINS
    assert max(np.sum(live, axis=0)) == 5100 and reserved.max() == n - 1
