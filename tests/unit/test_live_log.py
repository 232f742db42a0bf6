"""Per-step live logs: the CSV the progress display reads, and TensorBoard scalars."""

import pytest

from parallab.metrics.live import StepLog, last_step


def test_csv_has_one_line_per_step_and_the_last_is_readable(tmp_path):
    path = tmp_path / "logs" / "x.steps.csv"
    log = StepLog(path, steps=3, samples_per_step=16, tokens_per_step=16 * 128)
    assert last_step(path) is None  # header only
    log.write(0, 2.0, 5.5, "warm-up")
    log.write(1, 0.5, float("nan"), "timed")  # a pipeline stage without the loss
    step = last_step(path)
    assert step["step"] == "2" and step["steps"] == "3" and step["phase"] == "timed"
    assert float(step["samples_per_s"]) == pytest.approx(32.0) and step["loss"] == ""
    log.close()
    assert len(path.read_text().splitlines()) == 3


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is optional (pip install tensorboard); "
                                              "the project's lock file installs it")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = StepLog(tmp_path / "s.csv", steps=2, samples_per_step=4, tokens_per_step=64,
                  tensorboard_dir=tmp_path / "tb")
    log.write(0, 1.0, 3.0, "warm-up")
    log.write(1, 0.5, 2.5, "timed")
    log.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("samples_per_s")] == [4.0, 8.0]
    assert [e.value for e in acc.Scalars("loss")] == [3.0, 2.5]


def test_tensorboard_setting_without_the_package_is_refused(monkeypatch, tmp_path):
    import parallab.metrics.live as live
    from parallab.config import ConfigError, RuntimeSection, TrainArgs, validate_train

    monkeypatch.setattr(live, "tensorboard_available", lambda: False)
    args = TrainArgs(runtime=RuntimeSection(out_dir=str(tmp_path), tensorboard=True))
    with pytest.raises(ConfigError, match="runtime.tensorboard=true needs the tensorboard package"):
        validate_train(args)
