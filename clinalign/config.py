"""One config system for every entry script: dataclasses + a YAML file (`--config`) + CLI overrides.

The parser is TRL's `TrlParser` made strict:

- an unknown or misspelled key (in the YAML or on the command line) is an error that names it and
  suggests the closest valid key;
- a value of the wrong type is an error that names the key (argparse converts strings; YAML values
  that are already numbers, lists or booleans are checked against the dataclass annotation here,
  because argparse never looks at non-string defaults);
- a missing or unreadable config file is an error that names the path.

Every such error is a `ConfigError`: `run()` prints it as one line and exits with status 2, never a
traceback. Precedence: dataclass default < device default (see `_device_defaults`) < YAML < CLI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import enum
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from trl import ModelConfig, TrlParser

from clinalign.errors import ClinalignError, ConfigError
from clinalign.json_io import to_plain


@dataclasses.dataclass
class ModelArgs(ModelConfig):
    """TRL's `ModelConfig` (model path, dtype, LoRA, 4-bit) with the toolkit's defaults.

    `model_name_or_path` accepts the built-in names of `clinalign.models` (`smollm2`, `tiny-llama`,
    `tiny-gpt-oss`), a local folder, or a hub id.
    """

    model_name_or_path: str | None = dataclasses.field(
        default="smollm2",
        metadata={"help": "Base model: smollm2 (embedded default), tiny-llama, tiny-gpt-oss, a folder or a hub id."},
    )
    use_peft: bool = dataclasses.field(
        default=True, metadata={"help": "Train a LoRA adapter (the toolkit's stages all do) instead of all weights."}
    )
    dtype: str | None = dataclasses.field(
        default="auto",
        metadata={
            "help": "dtype of the frozen base weights. 'auto' = bfloat16 where the hardware has fast bf16 "
            "matmuls (CUDA Ampere+, or a CPU with AVX512-BF16), else float32.",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )


def _device_defaults() -> dict[str, Any]:
    """Defaults for TrainingArguments fields that depend on the machine (YAML and CLI still override).

    - No CUDA: train on the CPU (`use_cpu`), with bf16 autocast only where the CPU has AVX512-BF16.
    - No CUDA but launched by `accelerate launch` with a DeepSpeed config: DeepSpeed needs
      `use_cpu=False`, an explicit gloo backend (accelerate 1.15 otherwise sees one process), and
      fp32 (its CPU path has no bf16 autocast).
    """
    import torch

    if torch.cuda.is_available():
        return {"bf16": torch.cuda.is_bf16_supported()}
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return {"use_cpu": False, "ddp_backend": "gloo", "bf16": False}
    return {"use_cpu": True, "bf16": bool(torch.cpu._is_avx512_bf16_supported())}


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _matches(value: Any, annotation: Any) -> bool:
    """Whether a YAML value (already parsed, not a string) fits a dataclass annotation."""
    if annotation is Any or annotation is typing.Any:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in (list, Sequence, tuple):
        (item_type, *_) = typing.get_args(annotation) or (Any,)
        return isinstance(value, list) and all(_matches(v, item_type) for v in value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return isinstance(value, annotation) or value in {m.value for m in annotation}
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return True  # an annotation we do not model (a class, a callable): let the dataclass decide


class Parser(TrlParser):
    """`TrlParser` that fails loudly and in one line (see the module docstring)."""

    def __init__(self, dataclass_types: Sequence[type], **kwargs):
        super().__init__(dataclass_types=list(dataclass_types), **kwargs)
        self.explicit_keys: set[str] = set()  # keys the user set in the YAML or on the command line
        self.config_path: str | None = None
        self._hints = {}
        self._choices = {a.dest: a.choices for a in self._actions if a.choices is not None}
        for dtype in self.dataclass_types:
            hints = typing.get_type_hints(dtype)
            for f in dataclasses.fields(dtype):
                if f.init:
                    self._hints[f.name] = hints[f.name]

    def error(self, message: str):  # argparse calls this instead of raising; it would print the whole usage
        # "argument --max_steps/--max-steps: invalid int value: 'two'" -> name the key once
        match = re.match(r"argument --(\w+)(?:/--[\w-]+)?: (.*)", message)
        raise ConfigError(f"config key '{match[1]}': {match[2]}" if match else message)

    def _valid_keys(self) -> list[str]:
        return [a.dest for a in self._actions if a.dest != "help"]

    def _unknown(self, key: str, where: str) -> ConfigError:
        close = difflib.get_close_matches(key, self._valid_keys(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return ConfigError(f"unknown config key '{key}' {where}{hint}")

    def _load_yaml(self, path: str) -> dict[str, Any]:
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            config = yaml.load(Path(path).read_bytes().decode("utf-8"), Loader=_StrictLoader)
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if config is None:
            return {}
        if not isinstance(config, dict):
            raise ConfigError(f"config file {path} must hold a YAML mapping of key: value")
        return config

    def parse(self, args: Sequence[str] | None = None) -> tuple:
        args = list(sys.argv[1:] if args is None else args)
        if "-h" in args or "--help" in args:  # the first thing a new user types: the options, exit 0
            self.print_help()
            raise SystemExit(0)
        valid = set(self._valid_keys())
        defaults = {k: v for k, v in _device_defaults().items() if k in valid}
        self.set_defaults(**defaults)

        if "--config" in args:
            i = args.index("--config")
            if i + 1 >= len(args):
                raise ConfigError("--config needs a path to a YAML file")
            self.config_path = args[i + 1]
            del args[i : i + 2]
            config = self._load_yaml(self.config_path)
            for key, value in config.items():
                if key not in valid:
                    raise self._unknown(key, f"in {self.config_path}")
                if value is not None and not isinstance(value, str) and not _matches(value, self._hints[key]):
                    raise ConfigError(
                        f"config key '{key}' in {self.config_path} expects {_type_name(self._hints[key])}, "
                        f"got {value!r}"
                    )
                # argparse checks `choices` only for command-line values, never for defaults (the YAML's).
                choices = self._choices.get(key)
                values = value if isinstance(value, list) else [value]
                if choices is not None and value is not None and not {str(v) for v in values} <= set(map(str, choices)):
                    raise ConfigError(
                        f"config key '{key}' in {self.config_path}: invalid choice {value!r} "
                        f"(choose from {', '.join(map(str, choices))})"
                    )
            self.set_defaults(**config)
            self.explicit_keys |= set(config)

        for arg in args:
            if arg.startswith("--"):
                key = arg[2:].split("=", 1)[0].replace("-", "_")
                key = key[3:] if key.startswith("no_") and key[3:] in valid and key not in valid else key
                if key not in valid:
                    raise self._unknown(key, "on the command line")
                self.explicit_keys.add(key)
        try:
            parsed = tuple(self.parse_args_into_dataclasses(args=args, look_for_args_file=False))
        except (ValueError, TypeError) as e:  # a dataclass __post_init__ rejected a value
            raise ConfigError(str(e).strip().splitlines()[0]) from None
        for config in parsed:
            _check_ranges(config)
        return parsed


def eval_fraction_field() -> Any:
    """The `eval_fraction` option of every stage: one default, one meaning (see records.EVAL_FRACTION)."""
    from clinalign.records import EVAL_FRACTION

    return dataclasses.field(
        default=EVAL_FRACTION,
        metadata={
            "help": "The held-out share of records and safety prompts, by a hash of their ids: the same split in "
            "every stage (SFT, pairs, DPO, PPO, eval), so none trains on what eval holds out. Change it everywhere "
            "or nowhere."
        },
    )


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML itself keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# The numeric ranges of every stage's options, in one table: (low, low inclusive, high, high inclusive).
# A value outside is a one-line error naming the key (it used to be a traceback deep in a trainer, or
# worse, accepted: a negative epoch count published an untrained adapter).
_RANGES: dict[str, tuple[float | None, bool, float | None, bool]] = {
    "learning_rate": (0, False, None, False),
    "lora_r": (1, True, None, False),
    "lora_alpha": (0, False, None, False),
    "lora_dropout": (0, True, 1, False),
    "per_device_train_batch_size": (1, True, None, False),
    "per_device_eval_batch_size": (1, True, None, False),
    "gradient_accumulation_steps": (1, True, None, False),
    "num_train_epochs": (0, False, None, False),
    "beta": (0, False, None, False),
    "eval_fraction": (0, True, 1, False),
    "pairs_eval_fraction": (0, True, 1, False),
    "warmup_ratio": (0, True, 1, True),
    "weight_decay": (0, True, None, False),
    "max_grad_norm": (0, True, None, False),
    "temperature": (0, False, None, False),
    "num_generations": (1, True, None, False),
    "max_new_tokens": (1, True, None, False),
    "factuality_weight": (0, True, None, False),
    "safety_weight": (0, True, None, False),
}


# Options TRL's ModelConfig declares that clinalign does not honour: refused unless left at their
# default, so the strict parser never accepts what the toolkit would ignore.
_REFUSED: dict[str, tuple[Any, str]] = {
    "model_revision": (
        "main",
        "clinalign loads a hub id's default revision; to pin one, download it "
        "(hf download ID --revision REV --local-dir DIR) and name the folder as model_name_or_path",
    ),
    "trust_remote_code": (False, "clinalign loads only architectures built into transformers, never a repository's code"),
}


def _check_ranges(config: Any) -> None:
    if not dataclasses.is_dataclass(config):
        return
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    for key, (default, why) in _REFUSED.items():
        if key in values and values[key] not in (default, None):
            raise ConfigError(f"config key '{key}': {values[key]!r} is not supported ({why})")
    for key, (low, low_in, high, high_in) in _RANGES.items():
        value = values.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if (low is not None and (value < low or (value == low and not low_in))) or (
            high is not None and (value > high or (value == high and not high_in))
        ):
            left, right = ("[" if low_in else "("), ("]" if high_in else ")")
            bounds = f"{left}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}{right}"
            raise ConfigError(f"config key '{key}' must be in {bounds}, got {value}")
    steps = values.get("max_steps")
    if isinstance(steps, int) and not isinstance(steps, bool) and steps != -1 and steps < 1:
        raise ConfigError(f"config key 'max_steps' must be -1 (use epochs) or at least 1, got {steps}")
    output_dir = values.get("output_dir")
    if isinstance(output_dir, str) and output_dir and Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise ConfigError(f"config key 'output_dir': {output_dir} is a file, not a folder")


def resolved_config(*configs: Any) -> dict[str, Any]:
    """The flat key: value mapping of parsed dataclasses, loadable again with `--config`."""
    resolved: dict[str, Any] = {}
    for config in configs:
        for f in dataclasses.fields(config):
            if f.init and not f.name.startswith("_"):
                resolved[f.name] = to_plain(getattr(config, f.name))
    return resolved


def write_resolved_config(output_dir: str | Path, *configs: Any, name: str = "config.yaml") -> Path:
    path = Path(output_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(resolved_config(*configs), sort_keys=False))
    return path


def run(
    main: Callable[..., Any], parser: Parser, args: Sequence[str] | None = None, *, upstream_patches: bool = False
) -> Any:
    """Parse, call `main(*configs)` holding the run's `output_dir` (one run per folder: a second one is
    refused, naming the first's pid), and turn a `ClinalignError` into one line on stderr + exit 2.

    `upstream_patches`: a script that loads models applies clinalign.compat's patches here, at its
    start, after their version checks (a data-only script imports no TRL at all)."""
    from clinalign import compat
    from clinalign.run_dir import output_dir_lock

    try:
        configs = parser.parse(args)
        if upstream_patches:
            compat.apply()
        output_dirs = [c.output_dir for c in configs if isinstance(getattr(c, "output_dir", None), str) and c.output_dir]
        with output_dir_lock(output_dirs[0]) if output_dirs else contextlib.nullcontext():
            return main(*configs)
    except ClinalignError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
