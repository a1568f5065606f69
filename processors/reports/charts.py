"""The report's charts as PNG bytes, drawn with matplotlib's Agg renderer (no display, no pyplot:
a `Figure` per chart, safe in a worker thread). The same data gives the same bytes: the PNG
carries no Software/date metadata and Agg draws deterministically.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from labbus.processors.reports.model import StepReadings

DPI = 150
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=DPI, metadata={"Software": None})
    return out.getvalue()


def iv_pair(step: StepReadings) -> tuple[Sequence[float], Sequence[float]] | None:
    """(voltage, current) of a step that measured an I-V curve, sorted by voltage."""
    v, i = step.get("voltage"), step.get("current")
    if v is None or i is None or not v.values or len(v.values) != len(i.values):
        return None
    pairs = sorted(zip(v.values, i.values, strict=True))
    return [p[0] for p in pairs], [p[1] for p in pairs]


def iv_curves(steps: Sequence[StepReadings], title: str = "",
              pmax: Sequence[float | None] = ()) -> bytes | None:
    """I-V and P-V curves of the steps (e.g. before and after a stress) on one chart: current
    on the left axis, power on the right; `pmax[k]` (the analysis's Pmax of step k) in the
    legend. None when no step has an I-V curve."""
    curves = [(s, iv_pair(s)) for s in steps]
    curves = [(s, c) for s, c in curves if c is not None]
    if not curves:
        return None
    fig = Figure(figsize=(6.6, 3.4))
    ax = fig.add_subplot()
    power_ax = ax.twinx()
    for k, (step, (v, i)) in enumerate(curves):
        colour = COLOURS[k % len(COLOURS)]
        p = pmax[k] if k < len(pmax) else None
        label = step.step_id + (f" (Pmax {p:.2f} W)" if p is not None else "")
        ax.plot(v, i, color=colour, linewidth=1.4, label=label)
        power_ax.plot(v, [a * b for a, b in zip(v, i, strict=True)], color=colour,
                      linewidth=1.0, linestyle="--")
    ax.set_xlabel("Voltage (V)")
    ax.set_ylabel("Current (A), solid")
    power_ax.set_ylabel("Power (W), dashed")
    ax.set_ylim(bottom=0)
    power_ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    ax.grid(True, linewidth=0.4, alpha=0.6)
    ax.legend(loc="lower left", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.subplots_adjust(left=0.09, right=0.89, bottom=0.14, top=0.92 if title else 0.96)
    return _png(fig)


def comparison(labels: Sequence[str], before: Sequence[float], after: Sequence[float],
               title: str = "") -> bytes:
    """Before/after bars per parameter, as a percentage of its value before (100 % = no
    change), the relative change written over each pair."""
    fig = Figure(figsize=(6.6, 2.8))
    ax = fig.add_subplot()
    x = range(len(labels))
    relative = [100.0 * a / b if b else float("nan") for a, b in zip(after, before, strict=True)]
    ax.bar([k - 0.2 for k in x], [100.0] * len(labels), width=0.4, color=COLOURS[0],
           label="before")
    ax.bar([k + 0.2 for k in x], relative, width=0.4, color=COLOURS[1], label="after")
    for k, r in zip(x, relative, strict=True):
        ax.annotate(f"{r - 100:+.2f} %", (k + 0.2, r), ha="center", va="bottom", fontsize=8)
    low = min([r for r in relative if r == r] + [100.0])
    ax.set_ylim(max(0.0, low - 5), 103)
    ax.set_xticks(list(x), list(labels))
    ax.set_ylabel("% of before")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, axis="y", linewidth=0.4, alpha=0.6)
    if title:
        ax.set_title(title, fontsize=10)
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.1, top=0.9 if title else 0.95)
    return _png(fig)


MAX_POINTS = 4000  # a chamber run of 200 cycles has ~34 000 readings: thin them for the chart


def series_chart(step: StepReadings, title: str = "") -> bytes | None:
    """Each numeric series of a step against its reading index (one small panel each)."""
    series = [s for s in step.series if len(s.values) > 1]
    if not series:
        return None
    height = 0.9 + 1.3 * len(series)
    fig = Figure(figsize=(6.6, height))
    for k, s in enumerate(series):
        ax = fig.add_subplot(len(series), 1, k + 1)
        stride = max(1, len(s.values) // MAX_POINTS)
        values = s.values[::stride]
        ax.plot(range(0, len(s.values), stride), values, color=COLOURS[k % len(COLOURS)],
                linewidth=0.8)
        ax.set_ylabel(f"{s.metric}\n({s.unit})" if s.unit else s.metric, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, linewidth=0.4, alpha=0.6)
    fig.axes[-1].set_xlabel("reading", fontsize=8)
    if title:
        fig.axes[0].set_title(title, fontsize=10)
    # fixed margins in inches (tight_layout costs a third of the chart's time)
    fig.subplots_adjust(left=0.13, right=0.98, bottom=0.55 / height, top=1 - 0.25 / height,
                        hspace=0.35)
    return _png(fig)
