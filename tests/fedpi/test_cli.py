"""Every flag settable from FEDPI_<FLAG>, for Kubernetes."""

from __future__ import annotations

import re

import pytest

from coordinator_service.cli import parse_args as coordinator_args
from coordinator_service.cli import settings_of
from coordinator_service.control import launch
from coordinator_service.settings import SettingsError
from worker_service.cli import parse_args as worker_args


def settings(argv: list[str]):
    return settings_of(coordinator_args(argv))


def test_worker_flags_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("FEDPI_PORT", "6000")
    monkeypatch.setenv("FEDPI_PARTITION_INDEX", "2")
    monkeypatch.setenv("FEDPI_NO_DOWNLOAD", "true")
    args = worker_args([])
    assert (args.port, args.partition_index, args.no_download) == (6000, 2, True)


@pytest.mark.parametrize(
    "variable, value, phrase",
    [
        (
            "FEDPI_NO_DOWNLOAD",
            "maybe",
            "FEDPI_NO_DOWNLOAD='maybe' is not a valid value for --no-download: use true or false",
        ),
        ("FEDPI_LOG_FORMAT", "fancy", "FEDPI_LOG_FORMAT='fancy' is not a valid value for --log-format: choose from"),
        ("FEDPI_PORT", "http", "FEDPI_PORT='http' is not a valid value for --port"),
    ],
)
def test_a_variable_a_flag_would_refuse_is_refused(monkeypatch, capsys, variable, value, phrase):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exit_:
        worker_args([])
    assert exit_.value.code == 2 and phrase in capsys.readouterr().err


def test_a_run_setting_from_the_environment_is_checked_by_the_settings_model(monkeypatch):
    monkeypatch.setenv("FEDPI_MAX_UPDATE_RATIO", "nan")
    with pytest.raises(SettingsError, match="max_update_ratio = 'nan': Input should be a finite number"):
        settings(["train"])


def test_command_line_beats_environment(monkeypatch):
    monkeypatch.setenv("FEDPI_PORT", "6000")
    assert worker_args(["--port", "7000"]).port == 7000


def test_coordinator_subcommand_flags_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("FEDPI_ROUNDS", "3")
    monkeypatch.setenv("FEDPI_WORKERS_DNS", "fedpi-worker:50051")
    monkeypatch.setenv("FEDPI_LR", "0.1")
    args = coordinator_args(["train"])
    run = settings_of(args)
    assert (run.rounds, args.workers_dns, run.training.lr) == (3, "fedpi-worker:50051", 0.1)


def test_a_flag_switches_off_what_the_environment_switched_on(monkeypatch):
    monkeypatch.setenv("FEDPI_FEDERATED_EVALUATION", "true")
    assert settings(["train"]).evaluation.federated_evaluation
    assert not settings(["train", "--no-federated-evaluation"]).evaluation.federated_evaluation


def test_presets_set_defaults_that_flags_and_the_environment_override(monkeypatch):
    default = settings(["demo"]).training
    seed = settings(["demo", "--preset", "seed"]).training
    assert (seed.lr, seed.momentum, seed.local_batches, seed.batch_size) == (0.01, 0.0, 50, 64)
    assert (default.not_true_distillation, seed.not_true_distillation) == (0.5, 0.0)
    assert (default.effective_lr_schedule, seed.effective_lr_schedule) == ("cosine", "constant")
    assert (default.lr, default.momentum) != (seed.lr, seed.momentum)
    assert settings(["train", "--preset=seed", "--lr", "0.2"]).training.lr == 0.2
    monkeypatch.setenv("FEDPI_MOMENTUM", "0.3")
    assert settings(["demo", "--preset", "seed"]).training.momentum == 0.3
    monkeypatch.setenv("FEDPI_PRESET", "seed")
    assert settings(["demo"]).training.lr == 0.01


@pytest.mark.parametrize(
    "argv, env, budget",
    [
        (["demo"], {}, (1, 0, 0.0)),  # one epoch a round
        (["demo", "--local-batches", "20"], {}, (0, 20, 0.0)),
        (["demo", "--preset", "seed"], {}, (0, 50, 0.0)),
        (["demo", "--preset", "seed", "--local-epochs", "2"], {}, (2, 0, 0.0)),
        (["train", "--local-batches", "3"], {"FEDPI_LOCAL_SECONDS": "5"}, (0, 3, 0.0)),
        (["train"], {"FEDPI_LOCAL_SECONDS": "5"}, (0, 0, 5.0)),
    ],
)
def test_a_local_budget_given_replaces_the_one_below_it(monkeypatch, argv, env, budget):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    t = settings(argv).training
    assert (t.local_epochs, t.local_batches, t.local_seconds) == budget


@pytest.mark.parametrize(
    "flags, phrase",
    [
        (["--max-update-ratio", "nan"], "max_update_ratio = 'nan': Input should be a finite number"),
        (["--rounds", "-3"], "rounds = '-3': Input should be greater than or equal to 1"),
        (["--chunk-size", "0"], "chunk_size = '0': Input should be greater than or equal to 1024"),
        (["--round-retries", "1000000"], "round_retries = '1000000': Input should be less than or equal to 100"),
        (["--lr", "fast"], "lr = 'fast': Input should be a valid number"),
        (["--local-epochs", "2", "--local-seconds", "5"], "local_epochs and local_seconds exclude each other"),
        (["--local-batches", "5", "--local-epochs", "2"], "local_epochs and local_batches exclude each other"),
        (["--local-epochs", "0"], "give one local budget"),
    ],
)
def test_settings_out_of_range_are_refused_naming_the_setting(flags, phrase):
    with pytest.raises(SettingsError) as err:
        settings(["train", *flags])
    assert phrase in str(err.value)


def test_strategy_and_aggregation_compose_or_say_why_not():
    from coordinator_service.policy.strategy import FedAvg, FedNova

    assert type(launch.strategy(settings(["demo", "--local-seconds", "5"]), 3)) is FedNova
    assert type(launch.strategy(settings(["demo", "--local-seconds", "5", "--strategy", "fedavg"]), 3)) is FedAvg
    assert type(launch.strategy(settings(["demo", "--strategy", "fednova", "--aggregation", "clipped"]), 3)) is FedNova
    with pytest.raises(ValueError, match="ignores weights"):
        settings(["demo", "--strategy", "fednova", "--aggregation", "median"])
    # Sampling: the quorum is a majority of the workers that train in a round, and an impossible one is refused.
    assert launch.min_workers(settings(["demo", "--workers-per-round", "5"]), 20) == 3
    with pytest.raises(ValueError, match="can never be met"):
        launch.min_workers(settings(["demo", "--fraction", "0.1", "--min-workers", "3"]), 20)


@pytest.mark.parametrize(
    "command, usage",
    [
        (["train", "--help"], "usage: fedpi train"),
        (["demo", "--help"], "usage: fedpi demo"),
        (["worker", "--help"], "usage: fedpi worker"),
    ],
)
def test_the_fedpi_command_names_itself_in_help(command, usage, capsys):
    from fedpi_cli import main as fedpi

    with pytest.raises(SystemExit) as exit_:
        fedpi(command)
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith(usage)


def _commands() -> dict:
    import argparse

    from fedpi_cli import build_parser

    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_the_fedpi_command_lists_its_subcommands(capsys):
    from fedpi_cli import main as fedpi

    with pytest.raises(SystemExit) as exit_:
        fedpi(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and all(f"\n    {c} " in out for c in _commands())


def test_version(capsys):
    from fedpi import __version__
    from fedpi.net.protocol import PROTOCOL_VERSION
    from fedpi_cli import main as fedpi

    with pytest.raises(SystemExit) as exit_:
        fedpi(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"fedpi {__version__} (protocol {PROTOCOL_VERSION})\n"


@pytest.mark.parametrize(
    "argv, said",
    [
        (["trian"], "fedpi: error: argument COMMAND: invalid choice: 'trian'"),
        (["train", "--lrr", "0.1"], "fedpi train: error: unrecognized arguments: --lrr 0.1 (did you mean --lr?)"),
        (["train", "--compression", "fp61"], "(did you mean fp16?)"),
        (["runs", "lsit"], "(did you mean list?)"),
        (["serve", "--out", "x"], "unrecognized arguments: --out x"),  # no prefix matching: --out is not --output-dir
    ],
)
def test_a_mistake_is_one_line_with_the_closest_choice_not_the_whole_help(capsys, argv, said):
    from fedpi_cli import main as fedpi

    with pytest.raises(SystemExit) as exit_:
        fedpi(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and said in err and "usage:" not in err and len(err.splitlines()) == 2, err


def test_every_command_and_option_has_a_line_and_shows_its_default():
    def walk(parser, path):
        for action in parser._actions:
            if action.dest in ("help", "version") or action.help == "==SUPPRESS==":
                continue
            if hasattr(action, "choices") and isinstance(action.choices, dict):  # subcommands
                for name, sub in action.choices.items():
                    assert sub.description, f"{path} {name} has no description"
                    walk(sub, f"{path} {name}")
                assert all(c.help for c in action._choices_actions), f"{path}: a subcommand without a line"
                continue
            text = re.sub(r"\s*\[env FEDPI_[A-Z_]+\]$", "", action.help or "")  # the variable's name alone says nothing
            assert text, f"{path} {action.option_strings or action.dest} has no help"
            formatted = parser._get_formatter()._expand_help(action)
            if (
                action.option_strings
                and action.default not in (None, False, "==SUPPRESS==", "")
                and not isinstance(action.default, list)
            ):
                assert "default" in formatted, f"{path} {action.option_strings} does not show its default"

    for name, parser in _commands().items():
        walk(parser, f"fedpi {name}")


def test_help_imports_neither_torch_nor_grpc():
    import subprocess
    import sys

    code = (
        "import sys\nfrom fedpi_cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['worker', '--help'], ['runs', 'list', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print(sorted(m for m in ('torch', 'grpc', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "[]"


def test_global_options_go_before_or_after_the_runs_subcommand():
    from fedpi_cli import build_parser

    for argv in (
        ["runs", "--coordinator", "h:1", "list"],
        ["runs", "list", "--coordinator", "h:1"],
        ["runs", "start", "--coordinator", "h:1", "--token-file", "t", "--rounds", "2"],
    ):
        assert build_parser().parse_args(argv).coordinator == "h:1"
    assert build_parser().parse_args(["runs", "list"]).coordinator == "127.0.0.1:50050"


@pytest.mark.parametrize("shell, marker", [("bash", "complete"), ("zsh", "compdef"), ("fish", "complete")])
def test_shell_completion_scripts(capsys, shell, marker):
    from fedpi_cli import main as fedpi

    assert fedpi(["completion", shell]) == 0
    assert marker in capsys.readouterr().out


def test_the_task_comes_from_fedpi_task_and_the_built_in_task_takes_model_and_dataset(monkeypatch):
    from fedpi.cli import make_task
    from fedpi.mnist_task import MnistTask

    monkeypatch.setenv("FEDPI_TASK", "mnist")
    monkeypatch.setenv("FEDPI_MODEL", "large-mlp")
    task = make_task(worker_args([]))
    # the worker's default dataset is the coordinator's: auto (MNIST, or the shipped digits offline, said loudly)
    assert isinstance(task, MnistTask) and (task.architecture, task.data_name) == ("large-mlp", "auto")
    target = launch.RunTarget(task="mnist", model="reference-cnn")
    assert launch.make_task(target, launch.RunPlace(output_dir=".")).data_name == "auto"


def test_another_task_ignores_model_and_dataset_and_says_so(monkeypatch):
    from structlog.testing import capture_logs

    from fedpi.cli import make_task
    from tests.tiny_task import TinyTask

    monkeypatch.setenv("FEDPI_TASK", "tests.tiny_task:TinyTask")
    monkeypatch.setenv("FEDPI_DATASET", "mnist")  # left over in a fedpi.env
    with capture_logs() as logs:
        task = make_task(worker_args([]))
    assert isinstance(task, TinyTask)
    assert [e["event"] for e in logs] == ["task_options_ignored"] and logs[0]["dataset"] == "mnist"


def test_fedpi_tasks_lists_the_installed_tasks(capsys):
    from fedpi_cli import main

    assert main(["tasks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[:3] == ["mnist", "0.1.0", "fedpi.mnist_task:MnistTask"] for line in lines), lines


@pytest.mark.parametrize(
    "flags, updates, model",
    [
        ([], "none", "none"),
        (["--compression", "zlib"], "zlib", "zlib"),  # lossless: both ways
        (["--compression", "fp16"], "fp16", "none"),  # the global model goes down exact unless asked
        (["--compression", "bf16", "--compress-global-model"], "bf16", "bf16"),
        (["--compression", "int8"], "int8", "none"),
        (["--encoding", "zlib"], "zlib", "zlib"),  # the flag before --compression
    ],
)
def test_compression_flags_choose_each_direction(flags, updates, model):
    from fedpi.weights.compression import NAMES

    transfer = launch.transfer(settings(["train", "--workers", "a=h:1", *flags]))
    assert (NAMES[transfer.encoding], NAMES[transfer.model_encoding]) == (updates, model)


@pytest.mark.parametrize("compression", ["int8", "zlib", "none"])
def test_compressing_the_global_model_is_refused_unless_half_precision(compression):
    with pytest.raises(SettingsError, match="goes with compression fp16 or bf16"):
        settings(["train", "--workers", "a=h:1", "--compression", compression, "--compress-global-model"])


def test_every_help_ends_with_the_version(capsys):
    from fedpi.cli import version_line
    from fedpi_cli import main as fedpi

    for argv in (["--help"], ["train", "--help"], ["worker", "--help"], ["runs", "list", "--help"]):
        with pytest.raises(SystemExit):
            fedpi(argv)
        assert capsys.readouterr().out.rstrip().endswith(version_line())


def test_console_logs_carry_no_colour_codes_into_a_pipe():
    import subprocess
    import sys

    code = (
        "from fedpi.logs import configure_logging\nimport structlog\n"
        "configure_logging('console')\nstructlog.get_logger().warning('hello', worker='bob')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "hello" in out and "worker=bob" in out and "\x1b[" not in out


def test_status_into_a_closed_pipe_and_on_a_refused_port_answers_at_once_and_quietly():
    import subprocess
    import time

    start = time.monotonic()
    # 400 refused workers: more JSON than a pipe holds, so writing goes on after `head` has gone
    workers = ",".join(f"w{i}=127.0.0.1:1" for i in range(400))
    proc = subprocess.run(
        ["bash", "-c", f"python -m fedpi_cli status --workers {workers} --timeout 60 --json | head -c 1"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "PATH": _venv_path()},
    )
    assert time.monotonic() - start < 30  # not the 60 s timeout: a refused port is an answer
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def _venv_path() -> str:
    import os
    import sys

    return f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"


def test_a_help_says_each_option_s_variable_and_default_once(capsys):
    from fedpi_cli import main as fedpi

    for argv in (["worker", "--help"], ["train", "--help"], ["serve", "--help"], ["runs", "start", "--help"]):
        with pytest.raises(SystemExit):
            fedpi(argv)
        text = " ".join(capsys.readouterr().out.split())
        assert not re.search(r"\[env (\w+)\] \[env \1\]", text), argv
        assert not re.search(r"\(default: [^)]*\) \(default:", text), argv
        assert "(default: )" not in text, argv
