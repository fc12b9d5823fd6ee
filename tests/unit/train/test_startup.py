"""Start-up phases: laps add up to the whole start-up, parts belong to the stage they ran in, one line says it."""

from embedtrain.train.startup import StartupPhases


class Clock:
    """A clock the test moves by hand (no timing in tests)."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_laps_parts_line_and_record():
    clock, lines = Clock(), []
    phases = StartupPhases(lines.append, clock)
    with phases.phase("training data", "reading data/x.jsonl ..."):
        assert lines == ["reading data/x.jsonl ..."]  # the progress line comes as the part begins
        clock.now += 1.5
    with phases.phase("probe"):
        clock.now += 0.25
    clock.now += 0.25  # untimed work of the stage still belongs to it
    assert phases.lap("reading data") == 2.0
    clock.now += 2 ** -7  # a stage under 0.05 s is left out of the line (still recorded); binary fractions keep
    # the sums exact
    phases.lap("accelerator")
    with phases.phase("loading model", "loading model m ..."):
        clock.now += 4.0
    with phases.phase("tokenizing"):
        clock.now += 0.5
    with phases.phase("tokenizing"):  # a part timed twice adds up
        clock.now += 0.5
    phases.lap("building the model")
    assert lines == ["reading data/x.jsonl ...", "loading model m ..."]
    assert phases.seconds == 7 + 2 ** -7
    assert phases.to_dict() == {
        "total": 7.008,  # rounded to milliseconds
        "stages": {"reading data": 2.0, "accelerator": 0.008, "building the model": 5.0},
        "parts": {"reading data": {"training data": 1.5, "probe": 0.25},
                  "building the model": {"loading model": 4.0, "tokenizing": 1.0}},
    }
    assert phases.line() == ("start-up: 7.0 s before the first step (reading data 2.0: training data 1.5, probe 0.2; "
                             "building the model 5.0: loading model 4.0, tokenizing 1.0)")


def test_a_part_that_fails_is_still_timed():
    clock = Clock()
    phases = StartupPhases(lambda *_: None, clock)
    try:
        with phases.phase("loading model"):
            clock.now += 3.0
            raise ValueError("no such model")
    except ValueError:
        pass
    phases.lap("building the model")
    assert phases.parts == {"building the model": {"loading model": 3.0}}
