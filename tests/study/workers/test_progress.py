"""The worker's progress output: a bar on a terminal, plain counted lines everywhere else."""

import io

from study.workers.progress import TrialProgress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_without_a_terminal_only_counted_lines_are_printed():
    lines, stream = [], io.StringIO()
    progress = TrialProgress(4, 1, lines.append, stream=stream)
    progress.finished(2, "trial 1 COMPLETE", best=0.5)
    progress.finished(7, "trial 2 PRUNED")  # more finished than the total (other workers): capped
    progress.close()
    assert lines == ["[  2/4] trial 1 COMPLETE", "[  4/4] trial 2 PRUNED"]
    assert stream.getvalue() == ""


def test_on_a_terminal_the_bar_follows_the_study_and_lines_print_above_it(capsys):
    terminal, echoed = _Terminal(), []
    progress = TrialProgress(4, 1, echoed.append, stream=terminal)
    progress.finished(3, "trial 2 COMPLETE", best=0.8613)
    progress.close()
    bar = terminal.getvalue()
    assert "trials" in bar and "3/4" in bar and "best 0.8613" in bar
    assert capsys.readouterr().out.strip() == "[  3/4] trial 2 COMPLETE"  # lines go to stdout, not into the bar
    assert echoed == []


def test_pipeline_log_lines_print_above_the_bar_and_quiet_keeps_only_warnings(capsys):
    import logging

    from study.workers.progress import pipeline_lines

    teacher_log = logging.getLogger("objectives.teacher")
    terminal = _Terminal()
    progress = TrialProgress(4, 0, print, stream=terminal)
    with pipeline_lines(progress):
        teacher_log.info("training the teacher (digitnet)")
        teacher_log.warning("warning: the teacher's source val acc 0.1 is near chance")
    teacher_log.info("after the worker: not printed")
    progress.close()
    out, err = capsys.readouterr()
    assert out.strip() == "training the teacher (digitnet)"
    assert err.strip() == "warning: the teacher's source val acc 0.1 is near chance"

    with pipeline_lines(None):  # --quiet
        teacher_log.info("training the teacher (digitnet)")
        teacher_log.warning("warning: cache file x.pt is corrupt")
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == "warning: cache file x.pt is corrupt"
