"""The report's plots, each as a plotly figure (embedded in report.html) and a matplotlib PNG (Agg backend):
optimisation history, intermediate values (pruned trials marked), parameter importances, parallel coordinates,
the layer-group x action heatmap, and the Pareto front of multi-objective studies."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

STATE_COLORS = {"COMPLETE": "#1f77b4", "PRUNED": "#d62728", "RUNNING": "#7f7f7f", "FAIL": "#ff7f0e",
                "WAITING": "#7f7f7f"}


@dataclass
class Plot:
    key: str  # file stem and div id
    title: str
    plotly: Callable  # () -> plotly Figure
    png: Callable  # () -> matplotlib Figure


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fig_of(ax):
    """Optuna's matplotlib functions return an Axes or an array of them."""
    import numpy as np

    if isinstance(ax, np.ndarray):
        ax = ax.flat[0]
    return ax.figure


def plots(study: optuna.Study, trials, data: dict, effective: optuna.Study | None) -> list[Plot]:
    """The plots the data supports (the caller skips all of them below two completed trials)."""
    from optuna import visualization as vis
    from optuna.visualization import matplotlib as vmpl

    objective = data["objective"]
    multi = len(objective) > 1
    target = (lambda t: t.values[0]) if multi else None
    kw = {"target": target, "target_name": objective[0]}
    out = [Plot("history", f"Optimisation history ({objective[0]})",
                lambda: vis.plot_optimization_history(study, **kw),
                lambda: _fig_of(vmpl.plot_optimization_history(study, **kw)))]
    if any(t.intermediate_values for t in trials):
        out.append(Plot("intermediate", "Intermediate values (x = pruned here)",
                        lambda: _intermediate_plotly(trials), lambda: _intermediate_png(trials)))
    else:
        data["notes"].append("no intermediate values to plot" + (" (multi-objective trials report none: Optuna "
                                                                  "cannot prune them)" if multi else ""))
    imp = data.get("importance") or {}
    if "fanova" in imp:
        out.append(Plot("importance", f"Parameter importances for {objective[0]}",
                        lambda: _importance_plotly(imp), lambda: _importance_png(imp)))
    if effective is not None and len(effective.trials) >= 2 and data["importance"].get("params"):
        pkw = {"target_name": objective[0]}
        out.append(Plot("parallel", "Parallel coordinates (the values each trial ran with)",
                        lambda: vis.plot_parallel_coordinate(effective, **pkw),
                        lambda: _parallel_png(effective, objective[0])))
    if any(row["mean"] is not None for g in data["groups"].values() for row in g["actions"].values()):
        out.append(Plot("heatmap", "Mean target val acc per layer group and action (* = best mean)",
                        lambda: _heatmap_plotly(data["groups"]), lambda: _heatmap_png(data["groups"])))
    if multi and len(objective) > 3:
        data["notes"].append(f"no Pareto-front plot: it needs 2 or 3 objectives ({len(objective)})")
    if multi and len(objective) in (2, 3):
        fkw = {"target_names": objective}
        out.append(Plot("pareto", "Pareto front", lambda: vis.plot_pareto_front(study, **fkw),
                        lambda: _fig_of(vmpl.plot_pareto_front(study, **fkw))))
    return out


def write_png(plot: Plot, path: Path) -> None:
    plt = _mpl()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna.visualization.matplotlib is marked experimental
        fig = plot.png()
    fig.axes[0].set_title(plot.title, fontsize=10)  # replaces Optuna's generic title
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


# ---- intermediate values -----------------------------------------------------------------------------------------
def _curves(trials):
    for t in trials:
        if t.intermediate_values:
            steps = sorted(t.intermediate_values)
            yield t, steps, [t.intermediate_values[s] for s in steps]


def _intermediate_plotly(trials):
    import plotly.graph_objects as go

    fig, shown = go.Figure(), set()
    for t, x, y in _curves(trials):
        state = t.state.name
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=state, legendgroup=state,
                                 showlegend=state not in shown, line={"color": STATE_COLORS.get(state, "#333")},
                                 marker={"size": 5}, hovertemplate=f"trial {t.number} ({state})<br>step %{{x}}"
                                                                   "<br>%{y:.4f}<extra></extra>"))
        shown.add(state)
        if t.state == TrialState.PRUNED:
            fig.add_trace(go.Scatter(x=[x[-1]], y=[y[-1]], mode="markers", showlegend=False, legendgroup=state,
                                     marker={"symbol": "x", "size": 12, "color": STATE_COLORS["PRUNED"]},
                                     hovertemplate=f"trial {t.number} pruned at step {x[-1]}<extra></extra>"))
    fig.update_layout(title="Intermediate values", xaxis_title="global step (epoch)",
                      yaxis_title="target val acc")
    return fig


def _intermediate_png(trials):
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(7, 4))
    shown = set()
    for t, x, y in _curves(trials):
        state = t.state.name
        ax.plot(x, y, "-o", ms=3, lw=1, color=STATE_COLORS.get(state, "#333"),
                label=state if state not in shown else None)
        shown.add(state)
        if t.state == TrialState.PRUNED:
            ax.plot([x[-1]], [y[-1]], "x", ms=9, mew=2, color=STATE_COLORS["PRUNED"])
    ax.set_xlabel("global step (epoch)")
    ax.set_ylabel("target val acc")
    ax.legend(fontsize=8)
    return fig


# ---- importances -------------------------------------------------------------------------------------------------
def _importance_order(imp: dict) -> list[str]:
    return sorted(imp["fanova"], key=lambda p: (imp["fanova"][p], imp["ped_anova"].get(p, 0.0)))


def _importance_plotly(imp: dict):
    import plotly.graph_objects as go

    names = _importance_order(imp)
    fig = go.Figure([go.Bar(name="fANOVA", y=names, x=[imp["fanova"][p] for p in names], orientation="h"),
                     go.Bar(name="PED-ANOVA", y=names, x=[imp["ped_anova"].get(p, 0.0) for p in names],
                            orientation="h")])
    fig.update_layout(barmode="group", title=f"Parameter importances for {imp['target']} "
                                             f"({imp['n_trials']} trials)", xaxis_title="importance (sum 1)",
                      height=max(350, 40 * len(names)))
    return fig


def _importance_png(imp: dict):
    import numpy as np

    plt = _mpl()
    names = _importance_order(imp)
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, max(3, 0.4 * len(names))))
    ax.barh(y + 0.2, [imp["fanova"][p] for p in names], 0.4, label="fANOVA")
    ax.barh(y - 0.2, [imp["ped_anova"].get(p, 0.0) for p in names], 0.4, label="PED-ANOVA")
    ax.set_yticks(y, names)
    ax.set_xlabel("importance (sum 1)")
    ax.legend(fontsize=8)
    return fig


# ---- parallel coordinates (PNG) ---------------------------------------------------------------------------------
def _parallel_png(effective: optuna.Study, target_name: str):
    """One vertical axis per parameter (scaled to its observed range; log ranges on a log scale; categories
    evenly spaced), one line per trial coloured by its value. (Optuna's matplotlib version draws one twin axis per
    parameter, which is slow and crowded with a dozen parameters.)"""
    import numpy as np
    from optuna.distributions import CategoricalDistribution

    plt = _mpl()
    trials = effective.trials
    dists = trials[0].distributions
    names = [target_name, *sorted(dists)]
    columns, labels = [], []
    values = np.array([t.value for t in trials], dtype=float)
    for name in names:
        d = dists.get(name)
        if isinstance(d, CategoricalDistribution):
            x = np.array([d.choices.index(t.params[name]) for t in trials], dtype=float)
            lo, hi, ticks = 0.0, max(len(d.choices) - 1, 1), [str(c) for c in d.choices]
        else:
            x = values if d is None else np.array([float(t.params[name]) for t in trials])
            if getattr(d, "log", False):
                x = np.log10(x)
            lo, hi = float(x.min()), float(x.max())
            fmt = (lambda v: f"{10 ** v:.3g}") if getattr(d, "log", False) else (lambda v: f"{v:.3g}")
            ticks = [fmt(lo), fmt(hi)]
        columns.append((x - lo) / ((hi - lo) or 1.0))
        labels.append(ticks)
    data = np.array(columns).T
    fig, ax = plt.subplots(figsize=(max(8.0, 0.85 * len(names)), 4.5))
    cmap, norm = plt.get_cmap("viridis"), plt.Normalize(values.min(), values.max())
    for row, v in sorted(zip(data, values), key=lambda rv: rv[1]):  # best drawn last (on top)
        ax.plot(range(len(names)), row, color=cmap(norm(v)), alpha=0.8, lw=1.2)
    for i, ticks in enumerate(labels):
        ax.axvline(i, color="#444", lw=0.8)
        for j, tick in enumerate(ticks):
            y = j / max(len(ticks) - 1, 1)
            ax.annotate(tick, (i, y), xytext=(3, 0), textcoords="offset points", fontsize=7, va="center")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(-0.3, len(names) - 0.5)
    ax.grid(False)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=target_name)
    return fig


# ---- group x action heatmap --------------------------------------------------------------------------------------
def _grid(groups: dict):
    actions = list(dict.fromkeys(a for g in groups.values() for a in g["actions"]))
    z, text = [], []
    for g in groups.values():
        row_z, row_t = [], []
        for a in actions:
            cell = g["actions"].get(a)
            mean = cell["mean"] if cell else None
            row_z.append(mean)
            star = "*" if a == g["best_action"] else ""
            row_t.append("" if cell is None else (f"{mean:.3f}{star}\nn={cell['n']}" if mean is not None
                                                  else "-\nn=0"))
        z.append(row_z)
        text.append(row_t)
    return list(groups), actions, z, text


def _heatmap_plotly(groups: dict):
    import plotly.graph_objects as go

    names, actions, z, text = _grid(groups)
    fig = go.Figure(go.Heatmap(z=z, x=actions, y=names, text=[[s.replace("\n", "<br>") for s in r] for r in text],
                               texttemplate="%{text}", colorscale="Viridis", colorbar={"title": "mean acc"},
                               hovertemplate="%{y} %{x}: %{z:.4f}<extra></extra>"))
    fig.update_layout(title="Mean target val acc per layer group and action", yaxis={"autorange": "reversed"})
    return fig


def _heatmap_png(groups: dict):
    import numpy as np

    plt = _mpl()
    names, actions, z, text = _grid(groups)
    arr = np.ma.masked_invalid(np.array([[np.nan if v is None else v for v in r] for r in z], dtype=float))
    fig, ax = plt.subplots(figsize=(1.8 * len(actions) + 2, 0.7 * len(names) + 1.5))
    im = ax.imshow(arr, cmap="viridis", aspect="auto")
    ax.grid(False)
    ax.set_xticks(range(len(actions)), actions)
    ax.set_yticks(range(len(names)), names)
    for i, row in enumerate(text):
        for j, s in enumerate(row):
            ax.text(j, i, s, ha="center", va="center", fontsize=8, color="white" if z[i][j] is not None else "k")
    fig.colorbar(im, ax=ax, label="mean target val acc")
    return fig
