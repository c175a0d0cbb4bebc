"""Progress bars on a terminal and off it (a pipe, a log, Prefect's run logs)."""

import io

from wflw_pipeline import progress
from wflw_pipeline.progress import LineWriter, progress_bar


def test_line_writer_turns_redraws_into_lines_and_drops_blank_and_repeated_ones():
    out = io.StringIO()
    writer = LineWriter(out)

    redraws = ["\rtrain:   0%|", "\rtrain:   0%|", "\rtrain:  50%|#", "\r" + " " * 20 + "\r", "\n", "\rdone"]
    for text in redraws:
        writer.write(text)

    assert out.getvalue() == "train:   0%|\ntrain:  50%|#\ndone\n"


def test_a_bar_off_a_terminal_prints_plain_lines_at_most_every_interval(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 3600.0)

    for _ in progress_bar(range(1000), desc="convert", unit="image"):
        pass

    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 2, lines  # the start, then the end when the bar closes; nothing in between
    assert lines[0].startswith("convert:   0%") and lines[1].startswith("convert: 100%")
    assert "1000/1000" in lines[1]


def test_a_bar_on_a_terminal_is_tqdm_redrawing_in_place(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)

    for _ in progress_bar(range(3), desc="train", mininterval=0):
        pass

    assert terminal.getvalue().count("\r") >= 3
