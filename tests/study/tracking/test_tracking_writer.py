"""The background writer that keeps MLflow logging off the trial's thread (study/tracking/writer.py)."""

from __future__ import annotations

from study.tracking.writer import BackgroundWriter


def test_the_writer_runs_calls_in_order_and_ends_its_thread():
    writer, seen = BackgroundWriter(), []
    for i in range(50):
        writer.submit(seen.append, i)
    writer.submit(lambda: 1 / 0)  # a failure is reported, not raised, and does not stop the writer
    writer.submit(seen.append, "after")
    writer.close()
    assert seen == [*range(50), "after"]
    assert len(writer.errors) == 1 and "ZeroDivisionError" in writer.errors[0]
    assert writer._thread is None
