"""`study report` and `study compare`: what a study found, as numbers (JSON), tables (Markdown) or one
self-contained HTML page with plots. `build` gathers the numbers, `stats` computes them (bootstrap intervals, group
effects, importances), `plots` draws them, `render` writes HTML and Markdown."""

from study.report.build import build_report, compare_studies, write_report

__all__ = ["build_report", "compare_studies", "write_report"]
