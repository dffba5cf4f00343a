"""The report as one self-contained HTML page (tables, plotly figures, plotly.js inline: works offline) or as
Markdown (tables, links to the PNGs beside it). Both render the same tables from the report's data."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

ACC_COLUMNS = [("target_val_acc", "target val"), ("target_test_acc", "target test"),
               ("source_val_acc", "source val"), ("source_test_acc", "source test")]


@dataclass
class Table:
    title: str
    intro: str
    head: list[str]
    rows: list[list[str]] = field(default_factory=list)
    highlight: set[int] = field(default_factory=set)  # row indices to emphasise


def _num(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3g}"
    return str(v)


def _winner_rows(data: dict) -> list[tuple[str, dict, bool]]:
    """(role, trial summary, highlighted) of the winner table: the study's answer highlighted (a baseline's own
    row when the answer is a baseline), the search's best beside it when it is not the answer."""
    if "pareto_front" in data:
        rows = [("Pareto front", r, data["winner"] is not None and r["number"] == data["winner"]["number"])
                for r in data["pareto_front"]]
        return rows + [(f"baseline {r['baseline']}", r, False) for r in data["baselines"]]
    chosen = data.get("answer")
    rows = []
    if chosen is None and data["winner"]:
        rows.append(("winner (unconfirmed)", data["winner"], True))
    elif chosen is not None and chosen["kind"] == "configuration" and data["winner"]:
        rows.append((f"answer ({chosen['role']}, confirmed)", data["winner"], True))
    search = data.get("search_best")
    if chosen is not None and search and (not data["winner"] or search["number"] != data["winner"]["number"]):
        rows.append(("search's best (not the answer)", search, False))
    for r in data["baselines"]:
        is_answer = chosen is not None and chosen["kind"] == "baseline" and r["baseline"] == chosen["role"]
        rows.append((f"baseline {r['baseline']}" + (" (the answer, confirmed)" if is_answer else ""), r, is_answer))
    return rows


def _winner_table(data: dict) -> Table:
    multi = "pareto_front" in data
    rows = _winner_rows(data)
    groups = list(data["groups"])
    hypers = list(dict.fromkeys(k for _, r, _ in rows for k in r["hyperparameters"]))
    head = ["trial", "role", "state", *groups, *[h for _, h in ACC_COLUMNS], "delivered", "student params",
            "epochs to threshold", *hypers]
    title = "Pareto front vs baselines" if multi else "Winner vs baselines"
    recipes = " ".join(f"{name}: {recipe}." for name, recipe in data.get("baseline_recipes", {}).items())
    intro = (f"The winner is {data['winner_rule']}. Accuracies are those of the model each trial delivers on the "
             f"search's seed (its student stage chosen by pipeline.select, never the teacher; validation and test, "
             f"target and source domain); 'delivered' says when a distill-recipe trial delivered its fine-tuned "
             f"stage, not a distilled model. Baselines are the enqueued trials tagged 'baseline', in any state, each "
             f"at the epoch budget of a default trial. Layer actions: finetune (trained on the task), freeze (the "
             f"teacher's weights, not trained), replace (a new, smaller block trained from scratch), adapt (frozen "
             f"with a small trained adapter). {recipes}").strip()
    table = Table(title, intro, head)
    for i, (role, r, highlighted) in enumerate(rows):
        if highlighted:
            table.highlight.add(i)
        table.rows.append([str(r["number"]), role, r["state"], *[r["layers"].get(g, "-") for g in groups],
                           *[_num(r[k]) for k, _ in ACC_COLUMNS], r.get("delivered") or "-",
                           _num(r["student_params"]), _num(r["epochs_to_threshold"]),
                           *[_num(r["hyperparameters"].get(h)) for h in hypers]])
    return table


def _group_table(data: dict) -> Table:
    b = data["bootstrap"]
    intro = (f"Completed trials per layer group and action (from each trial's recorded choices, so pinned groups "
             f"and baselines count), their mean and best target val acc, and a {b['level']:.0%} {b['method']} "
             f"({b['resamples']} resamples, seed {b['seed']}; none below {b['min_trials']} trials). Trials that "
             f"delivered identical models count once. Pruned trials are counted apart. The action with the best "
             f"mean per group is marked *.")
    table = Table("Per-group effect", intro, ["group", "action", "completed", "pruned", "mean", "95% interval",
                                              "best", "best trial"])
    _effect_rows(table, data["groups"])
    return table


def _effect_rows(table: Table, cells: dict) -> None:
    """One row per (group or choice, value) of an effect table, the best mean of each marked *."""
    for g, cell in cells.items():
        for a, r in cell["actions"].items():
            if a == cell["best_action"]:
                table.highlight.add(len(table.rows))
            ci = f"[{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}]" if r["ci95"] else ("too few trials" if r["n"] else "-")
            table.rows.append([g, a + (" *" if a == cell["best_action"] else ""), str(r["n"]), str(r["pruned"]),
                               _num(r["mean"]), ci, _num(r["best"]), _num(r["best_trial"])])


def _choice_table(data: dict) -> Table | None:
    choices = {n: c for n, c in data.get("choices", {}).items() if c["actions"]}
    if not choices:
        return None
    intro = ("The same for every other searched set of choices (the layer term, the recipe, ...): each value's "
             "completed trials, mean and best target val acc and interval. A trial counts for a choice only where the "
             "choice applied (the layer term of a finetune-recipe trial, a baseline's included, is not counted), and "
             "under the recipe it delivered: a distill-recipe trial whose fine-tuned stage was chosen (delivered: "
             "finetune stage, not distilled) counts as finetune. The value with the best mean is marked *.")
    table = Table("Per-choice effect", intro, ["choice", "value", "completed", "pruned", "mean", "95% interval",
                                               "best", "best trial"])
    _effect_rows(table, choices)
    return table


def _importance_table(data: dict) -> Table | None:
    imp = data["importance"]
    if "fanova" not in imp:
        return None
    intro = (f"Importance of each sampled parameter for {imp['target']} over {imp['n_trials']} completed trials "
             f"(optuna PedAnovaImportanceEvaluator and FanovaImportanceEvaluator, each normalised to sum 1). Every "
             f"trial enters with the values it ran with: a conditional parameter that was not sampled (the "
             f"temperature without distillation, the slim width without slim replacements) takes its default. "
             f"PED-ANOVA compares the top 10% of trials with all of them: below about 50 trials that top set is "
             f"small and its importances are noisy.")
    table = Table("Parameter importances", intro, ["parameter", "fANOVA", "PED-ANOVA"])
    for p in sorted(imp["fanova"], key=lambda p: -imp["fanova"][p]):
        table.rows.append([p, f"{imp['fanova'][p]:.4f}", f"{imp['ped_anova'].get(p, 0.0):.4f}"])
    return table


def _confirmation_table(data: dict) -> Table | None:
    conf = data.get("confirmation")
    if not conf:
        return None
    verdict = conf["verdict"]["text"] if conf["verdict"] else "too few confirmation runs completed for a verdict"
    resample = conf.get("resample", "none")
    splits = ("each seed draws its own split of the data into train, val and test and trains its own teacher, so the "
              "interval speaks about new data" if resample == "splits" else
              "every seed keeps the study's one split of the data and its teacher, so the interval speaks about "
              "that split only")
    intro = (f"Verdict: {verdict}. {'' if conf.get('complete', True) else 'Runs are still pending: not final. '}"
             f"How to read it: the search picked its configurations on the target validation split (target val, "
             f"images of the target domain used to choose); the target test split is never used to choose anything "
             f"and measures how the chosen model does on unseen target images. The top distinct configurations and "
             f"the baselines were re-run on fresh seeds (a seed fixes the students' initialisation and batch order; "
             f"resample: {resample}: {splits}) in study {conf['study']}. Each row: the mean over the seeds and its "
             f"95% interval (Student-t, clipped to [0, 1]): with that many seeds, the range the true mean most "
             f"likely lies in. The winner is the configuration with the best mean target val; it is then compared "
             f"with each baseline seed by seed on target test (the table below). The answer is highlighted. "
             f"'delivered' counts what its runs delivered: 'distill 4, finetune 1' is four distilled models and "
             f"one run whose fine-tuned "
             f"stage scored best (no evidence about distillation).")
    table = Table("Verdict and confirmation", intro, ["configuration", "trial", "seeds", "target test",
                                                      "test 95% CI", "target val", "val 95% CI", "delivered"])
    chosen = conf["verdict"]["answer"]["role"] if conf["verdict"] else None
    for c in conf["configs"]:
        if c["role"] == chosen:
            table.highlight.add(len(table.rows))
        table.rows.append([c["role"], str(c["trial"]), str(len(c["seeds"])), _num(c["target_test_mean"]), _ci(
            c["target_test_ci"]), _num(c["target_val_mean"]), _ci(c["target_val_ci"]),
            ", ".join(f"{kind} {n}" for kind, n in sorted(c.get("delivered", {}).items()))])
    return table


def _comparison_table(data: dict) -> Table | None:
    conf = data.get("confirmation")
    if not conf or not conf["verdict"]:
        return None
    v = conf["verdict"]
    intro = (f"The winner (trial {v['best_trial']}) minus each baseline, target test accuracy in points, paired by "
             f"seed (the same seeds, so the same data and teacher): the mean difference and its 95% interval. "
             f"beats: the interval lies above 0; loses: below 0; ties: it contains 0 (the seeds cannot tell them "
             f"apart). The verdict says 'use' the winner only if it beats or ties every baseline; otherwise the "
             f"baseline(s) that beat it.")
    table = Table("Winner against each baseline", intro, ["baseline", "seeds", "difference (points)",
                                                          "95% CI (points)", "outcome"])
    for c in v["comparisons"]:
        ci = c["diff_ci"]
        table.rows.append([c["baseline"], str(len(c["seeds"])),
                           f"{100 * c['diff_mean']:+.1f}" if c["diff_mean"] is not None else "-",
                           f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "-", c["outcome"]])
    return table


def _ci(ci) -> str:
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "-"


def tables(data: dict) -> list[Table]:
    out = [_confirmation_table(data), _comparison_table(data), _winner_table(data), _group_table(data),
           _choice_table(data), _importance_table(data)]
    return [t for t in out if t is not None]


def _summary(data: dict) -> list[str]:
    counts = ", ".join(f"{n} {s.lower()}" for s, n in data["counts"].items() if n) or "no trials"
    return [f"task {data['task']}, model {data['arch']}, objective {', '.join(data['objective'])} "
            f"({', '.join(data['directions'])})", f"storage {data['storage']}, generated {data['generated']}",
            f"trials: {counts}"]


# ---- HTML --------------------------------------------------------------------------------------------------------
CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}th{background:#f0f0f0}
td:nth-child(-n+3){text-align:left}tr.best td{background:#fff3b0;font-weight:600}.wrap{overflow-x:auto}
.notes li{color:#8a4b00}.intro{color:#555;max-width:60em}.plot{margin-bottom:2em}"""


def render_html(data: dict, figures: dict) -> str:
    """One page: summary, notes, tables, then each plot (plotly.js is inlined once, so it works offline)."""
    from markupsafe import Markup

    plotlyjs = ""
    if figures:
        from plotly.offline import get_plotlyjs

        plotlyjs = Markup(get_plotlyjs())
    plots = []
    for key, meta in data["plots"].items():
        fig = figures.get(key)
        figure = None if fig is None else Markup(fig.to_html(
            full_html=False, include_plotlyjs=False, div_id=f"plot-{key}", default_height="480px",
            config={"displaylogo": False}))
        plots.append({"title": meta["title"], "png": meta["png"], "figure": figure})
    return _template("report.html.j2").render(
        study=data["study"], css=Markup(CSS), plotlyjs=plotlyjs, summary=_summary(data), notes=data["notes"],
        tables=tables(data), plots=plots)


@functools.cache
def _template(name: str):
    """A template of templates/, autoescaped; a block tag's own line leaves no blank line behind."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    return env.get_template(name)


# ---- Markdown ----------------------------------------------------------------------------------------------------
def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("*", "\\*")


def render_md(data: dict) -> str:
    lines = [f"# Study {data['study']}", ""] + [f"{line}  " for line in _summary(data)] + [""]
    lines += [f"- **note:** {n}" for n in data["notes"]] + ([""] if data["notes"] else [])
    for t in tables(data):
        lines += [f"## {t.title}", "", t.intro, "", "| " + " | ".join(map(_md_cell, t.head)) + " |",
                  "|" + "|".join("---" for _ in t.head) + "|"]
        for i, row in enumerate(t.rows):
            cells = [f"**{_md_cell(c)}**" if i in t.highlight and c not in ("", "-") else _md_cell(c) for c in row]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if data["plots"]:
        lines += ["## Plots", ""]
    for meta in data["plots"].values():
        lines += [f"### {meta['title']}", "", f"![{meta['title']}]({meta['png']})", ""]
    return "\n".join(lines)
