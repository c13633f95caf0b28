"""--config run.toml: one more source of options, below the environment and the command line."""

from __future__ import annotations

import json

import pytest

from fedpi_cli import main as fedpi


def _show(capsys, *argv: str) -> dict:
    assert fedpi(["config", "show", "-o", "json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_each_run_setting_comes_from_the_highest_source_and_says_which(tmp_path, monkeypatch, capsys):
    config = tmp_path / "run.toml"
    config.write_text('rounds = 3\nlr = 0.02\nmomentum = 0.5\nlog-format = "json"\n[training]\nlocal-batches = 20\n')
    monkeypatch.setenv("FEDPI_LR", "0.03")
    shown = _show(capsys, "--config", str(config), "--preset", "seed", "--momentum", "0.7")
    assert shown["rounds"] == {"value": 3, "source": f"config {config}"}
    assert shown["local_batches"] == {"value": 20, "source": f"config {config}"}
    assert shown["lr"] == {"value": 0.03, "source": "env FEDPI_LR"}  # the environment over the file
    assert shown["momentum"] == {"value": 0.7, "source": "flag --momentum"}  # the flag over both
    assert shown["batch_size"] == {"value": 64, "source": "preset seed"}
    assert shown["seed"] == {"value": 0, "source": "default"}


def test_other_options_come_from_the_file_unless_a_flag_or_the_environment_sets_them(tmp_path, monkeypatch):
    from coordinator_service.cli import build_parser, read_config
    from fedpi.cli import innermost

    config = tmp_path / "run.toml"
    config.write_text('output-dir = "from-file"\nlatest-link = "file-link"\nno-download = true\n')

    def parsed(*argv):
        argv = ["train", "--config", str(config), *argv]
        parser = build_parser()
        args = parser.parse_args(argv)
        args.command_parser, args.argv = innermost(parser, args), argv
        read_config(args)
        return args

    args = parsed()
    assert (args.output_dir, args.latest_link, args.no_download) == ("from-file", "file-link", True)
    assert parsed("--output-dir", "from-flag").output_dir == "from-flag"
    monkeypatch.setenv("FEDPI_LATEST_LINK", "env-link")
    assert parsed().latest_link == "env-link"


@pytest.mark.parametrize(
    "content, said",
    [
        ('output-dirr = "x"', "output-dirr is not an option of this command (did you mean output-dir?)"),
        ('lr = "fast"', "lr = 'fast': Input should be a valid number"),
        ("no-download = 3", "no-download = 3: use true or false"),
        ('log-format = "fancy"', "log-format = 'fancy': choose from auto, json, console"),
        ("lr = ", "not TOML"),
    ],
)
def test_a_bad_file_is_refused_naming_the_key(tmp_path, capsys, content, said):
    config = tmp_path / "run.toml"
    config.write_text(content + "\n")
    assert fedpi(["train", "--config", str(config), "--workers", "a=127.0.0.1:1"]) == 2
    assert said in capsys.readouterr().err
