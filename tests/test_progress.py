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


def test_a_bar_off_a_terminal_prints_plain_lines(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0)

    for _ in progress_bar(range(3), desc="convert", unit="image"):
        pass

    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    percents = [line.split("|")[0] for line in lines]
    assert percents[:4] == ["convert:   0%", "convert:  33%", "convert:  67%", "convert: 100%"]
    assert set(percents[4:]) <= {"convert: 100%"}  # the close redraws 100 % (its rate may differ)
    assert "3/3" in lines[-1]


def test_a_loop_shorter_than_the_interval_prints_nothing_off_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 3600.0)

    for _ in progress_bar(range(1000), desc="train", leave=False):
        pass

    assert capsys.readouterr().err == ""


def test_a_bar_on_a_terminal_is_tqdm_redrawing_in_place(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)

    for _ in progress_bar(range(3), desc="train", mininterval=0):
        pass

    assert terminal.getvalue().count("\r") >= 3
