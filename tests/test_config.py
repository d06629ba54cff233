"""The strict config system: every failure mode is one line on stderr and exit status 2."""

from __future__ import annotations

import dataclasses
import re
import runpy
from pathlib import Path

import pytest
from trl import SFTConfig

from clinalign.config import ModelArgs, Parser, resolved_config, run
from clinalign.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class DemoArgs:
    steps: int = 3
    rate: float = 0.5
    names: list[str] = dataclasses.field(default_factory=lambda: ["a"])
    mode: str = dataclasses.field(default="fast", metadata={"choices": ["fast", "slow"]})


def parse(tmp_path, yaml_text: str | None, *cli: str):
    args = list(cli)
    if yaml_text is not None:
        path = tmp_path / "c.yaml"
        path.write_text(yaml_text)
        args = ["--config", str(path), *args]
    return Parser([DemoArgs]).parse(args)


def test_yaml_then_cli_precedence(tmp_path):
    (args,) = parse(tmp_path, "steps: 7\nrate: 2\nnames: [x, y]\n", "--rate", "0.25")
    assert (args.steps, args.rate, args.names, args.mode) == (7, 0.25, ["x", "y"], "fast")


@pytest.mark.parametrize(
    ("yaml_text", "cli", "message"),
    [
        ("stpes: 7\n", [], "unknown config key 'stpes' in"),
        (None, ["--rtae", "1"], "unknown config key 'rtae' on the command line (did you mean 'rate'?)"),
        ("steps: 2.5\n", [], "config key 'steps' in"),
        ("steps: many\n", [], "config key 'steps': invalid int value: 'many'"),
        ("names: 3\n", [], "config key 'names' in"),
        ("mode: medium\n", [], "config key 'mode' in"),
        (None, ["--mode", "medium"], "config key 'mode': invalid choice: 'medium'"),
        ("- a\n- b\n", [], "must hold a YAML mapping"),
        ("steps: [\n", [], "is not valid YAML"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path, yaml_text, cli, message):
    with pytest.raises(ConfigError) as err:
        parse(tmp_path, yaml_text, *cli)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        Parser([DemoArgs]).parse(["--config", str(tmp_path / "nope.yaml")])


def test_resolved_config_round_trips(tmp_path):
    (args,) = parse(tmp_path, "steps: 9\nnames: [p, q]\nmode: slow\n")
    path = tmp_path / "resolved.yaml"
    import yaml

    path.write_text(yaml.safe_dump(resolved_config(args)))
    (again,) = Parser([DemoArgs]).parse(["--config", str(path)])
    assert again == args


def sft_entry():
    return runpy.run_path(str(REPO / "sft" / "run.py"), run_name="config_check")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--learning_rte", "1e-3"], "error: unknown config key 'learning_rte' on the command line (did you mean 'learning_rate'?)"),
        (["--max_steps", "two"], "error: config key 'max_steps': invalid int value: 'two'"),
        (["--model_name_or_path", "./no/such/model"], "error: model not found: ./no/such/model"),
    ],
)
def test_entry_script_failure_modes(capsys, tmp_path, extra, message):
    entry = sft_entry()
    argv = ["--config", str(REPO / "configs/sft/tiny.yaml"), "--output_dir", str(tmp_path), *extra]
    with pytest.raises(SystemExit) as exit_info:
        run(entry["main"], entry["make_parser"](), argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message), err
    assert len(err.splitlines()) == 1


def test_missing_config_file_from_the_command_line(run_script, tmp_path):
    """The real CLI: no traceback, one line, exit status 2."""
    result = run_script("sft/run.py", "--config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: config file not found: {tmp_path / 'missing.yaml'}"
    assert "Traceback" not in result.stderr


def test_model_args_defaults():
    (model_args,) = Parser([ModelArgs]).parse([])
    assert model_args.model_name_or_path == "smollm2"
    assert model_args.use_peft is True
    assert model_args.dtype == "auto"


@pytest.mark.parametrize(
    "cli, message",
    [
        (["--model_revision", "v1.0"], "config key 'model_revision': 'v1.0' is not supported"),
        (["--trust_remote_code", "true"], "config key 'trust_remote_code': True is not supported"),
    ],
)
def test_model_options_clinalign_would_ignore_are_refused(cli, message, tmp_path):
    """Strict parsing never accepts what the toolkit ignores: a revision or remote code it would not load."""
    # model_revision is ModelConfig's, trust_remote_code the trainer config's: both reach sft/run.py's parser.
    parser = Parser([ModelArgs, SFTConfig])
    with pytest.raises(ConfigError, match=re.escape(message)):
        parser.parse(cli + ["--output_dir", str(tmp_path)])
    model_args, sft_args = parser.parse(
        ["--model_revision", "main", "--trust_remote_code", "false", "--output_dir", str(tmp_path)]
    )
    assert model_args.model_revision == "main" and sft_args.trust_remote_code is False
