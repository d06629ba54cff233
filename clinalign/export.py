"""Merge a trained adapter into its base and write a standalone checkpoint that needs no PEFT.

    python -m clinalign.export --adapter runs/demo/dpo --output_dir runs/demo/export/dpo
    python -m clinalign.export --adapter runs/demo/reward --output_dir runs/demo/export/reward
    python -m clinalign.export --adapter runs/demo/dpo --output_dir merged --push_to_hub ORG/NAME

An SFT stage, DPO or PPO adapter (a causal-LM LoRA) is loaded onto the base its clinalign_base.json
names (`clinalign.models.load_policy`, which checks the base fingerprint) and merged with PEFT's
`merge_and_unload`; the result loads with `AutoModelForCausalLM`. A reward model (sequence
classification LoRA + `score` head) is rebuilt as reward/train.py trained it (the base, with its SFT
adapter merged in first) and merged the same way; it loads with `AutoModelForSequenceClassification`.
GPT-OSS merges its expert LoRA too (PEFT's `target_parameters` wrappers merge into the fused expert
stacks).

The merge is always done on 16-bit base weights: an adapter trained on 4-bit (NF4) weights is merged
into the 16-bit base (NF4 cannot hold W + BA without rounding it again), and the log and the card
say so. Before merging, the base + adapter's output on a probe prompt is recorded; the merged model's
must match it (`probe_max_abs_diff` in metrics.json and the card).

OUTPUT_DIR gets model.safetensors, config.json, the tokenizer with its chat template (the harmony
template for GPT-OSS), README.md (clinalign.model_card), clinalign_export.json, metrics.json and
config.yaml. `--push_to_hub REPO` then uploads the folder; offline (HF_HUB_OFFLINE) or without a
reachable hub or token it is a one-line error before anything is merged.
"""

from __future__ import annotations

import dataclasses
import gc
import json
from pathlib import Path

import torch
import yaml
from peft import PeftModel

from clinalign.adapters import PROVENANCE_FILE, check_adapter_base, read_adapter_config
from clinalign.config import Parser, run, write_resolved_config
from clinalign.devices import resolve_dtype
from clinalign.errors import ClinalignError, ConfigError
from clinalign.json_io import write_json
from clinalign.model_card import EXPORT_FILE, stage_kind, write_model_card
from clinalign.models import ensure_pad_token, load_policy, load_tokenizer, model_type, no_router_logits
from clinalign.prompts import CLINICAL_INSTRUCTIONS
from clinalign.rewards import reward_backbone


@dataclasses.dataclass
class ExportArgs:
    adapter: str = dataclasses.field(
        default="", metadata={"help": "Adapter folder: an SFT stage, DPO, PPO or reward model (reward/train.py)."}
    )
    output_dir: str = dataclasses.field(default="", metadata={"help": "Where the merged checkpoint goes."})
    base: str | None = dataclasses.field(
        default=None, metadata={"help": "The base model (default: the one the adapter's clinalign_base.json names)."}
    )
    dtype: str = dataclasses.field(
        default="auto",
        metadata={"help": "dtype of the merged weights: auto (bfloat16 where fast, else float32), bfloat16, "
                          "float16 or float32. Never 4-bit: a merge is done on 16-bit weights.",
                  "choices": ["auto", "bfloat16", "float16", "float32"]},
    )  # fmt: skip
    push_to_hub: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Also upload the folder to this hub repo (ORG/NAME); needs network and a token."},
    )
    private: bool = dataclasses.field(default=True, metadata={"help": "Create the hub repo as private."})


def check_hub(repo_id: str) -> None:
    """Fail before any work when a push cannot happen: offline, no hub, no token."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise ClinalignError(
            f"--push_to_hub {repo_id}: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it on a machine "
            f"with network, or export without --push_to_hub and upload later (hf upload {repo_id} OUTPUT_DIR)"
        )
    if repo_id.count("/") != 1:
        raise ConfigError(f"--push_to_hub needs a repo id ORG/NAME, got {repo_id!r}")
    try:
        HfApi().whoami()
    except Exception as e:  # no network, no token, a revoked token: whatever the hub client raises
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClinalignError(f"--push_to_hub {repo_id}: cannot use the Hugging Face Hub ({reason})") from None


def _adapter_facts(adapter: Path) -> dict:
    adapter_config = read_adapter_config(adapter)
    provenance_file = adapter / PROVENANCE_FILE
    provenance = json.loads(provenance_file.read_text()) if provenance_file.is_file() else {}
    config_file = adapter / "config.yaml"
    config = (yaml.safe_load(config_file.read_text()) or {}) if config_file.is_file() else {}
    return {
        "provenance": provenance,
        "reward": adapter_config.get("task_type") == "SEQ_CLS",
        "stage": stage_kind(config),
        "trained_in_4bit": bool(
            (provenance.get("quantization") or {}).get("load_in_4bit") or config.get("load_in_4bit")
        ),
        "base": provenance.get("base") or adapter_config.get("base_model_name_or_path"),
    }


def _probe(model, tokenizer, reward: bool) -> torch.Tensor:
    """The model's output on one fixed chat prompt: last-position logits, or the reward score."""
    messages = [
        {"role": "system", "content": CLINICAL_INSTRUCTIONS},
        {
            "role": "user",
            "content": "Question: Which vitamin deficiency causes scurvy?\nOptions:\nA. Vitamin C\nB. Iron",
        },
    ]
    if reward:
        messages.append({"role": "assistant", "content": "Answer: A. Vitamin C"})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not reward)
    batch = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
    extra = no_router_logits(model)
    with torch.no_grad():
        logits = model(**batch, **extra).logits
    return (logits[:, 0] if reward else logits[:, -1]).float().cpu()


def load_unmerged(adapter: Path, base: str, reward: bool, dtype: torch.dtype):
    """(base + adapter as a PeftModel on 16-bit weights, tokenizer), in eval mode.

    A reward model's backbone is rebuilt as reward/train.py built it (its SFT adapter merged in) but
    never quantized; GPT-OSS loads through harmony.gpt_oss (an MXFP4 checkpoint dequantized on load).
    """
    if reward:
        provenance = json.loads((adapter / PROVENANCE_FILE).read_text())
        backbone = reward_backbone(base, provenance.get("merged_adapter"), dtype=dtype)
    elif model_type(base) == "gpt_oss":
        from harmony.gpt_oss import load_gpt_oss

        backbone = load_gpt_oss(base, dtype=dtype, load_in_4bit=False)
    else:
        return load_policy(base, adapter, dtype=dtype)
    check_adapter_base(adapter, base, backbone)
    model = PeftModel.from_pretrained(backbone, adapter)
    has_tokenizer = (adapter / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(str(adapter) if has_tokenizer else base)
    ensure_pad_token(tokenizer, model)
    return model.eval(), tokenizer


def main(args: ExportArgs):
    if not args.adapter:
        raise ConfigError("give --adapter, the adapter folder to merge")
    if not args.output_dir:
        raise ConfigError("give --output_dir, where the merged checkpoint goes")
    adapter, output_dir = Path(args.adapter), Path(args.output_dir)
    if output_dir.resolve() == adapter.resolve():
        raise ConfigError("output_dir must not be the adapter folder: the merged model would overwrite the adapter")
    if args.push_to_hub:
        check_hub(args.push_to_hub)
    facts = _adapter_facts(adapter)
    base = args.base or facts["base"]
    if not base:
        raise ClinalignError(f"adapter {adapter} names no base model: give --base")
    if facts["reward"] and not (adapter / PROVENANCE_FILE).is_file():
        raise ClinalignError(f"reward model {adapter} has no {PROVENANCE_FILE}: it cannot be rebuilt as trained")
    dtype = resolve_dtype(args.dtype)
    if facts["trained_in_4bit"]:
        print(f"[export] {adapter} was trained on 4-bit base weights: merging it into the 16-bit "
              f"({str(dtype).removeprefix('torch.')}) base weights instead")  # fmt: skip

    model, tokenizer = load_unmerged(adapter, base, facts["reward"], dtype)
    before = _probe(model, tokenizer, facts["reward"])
    merged = model.merge_and_unload()
    after = _probe(merged, tokenizer, facts["reward"])
    probe_diff = (before - after).abs().max().item()
    # The weights saved are plain 16-bit tensors: no quantization block may claim otherwise
    # (an MXFP4 GPT-OSS checkpoint dequantized on load keeps one in its config).
    if getattr(merged.config, "quantization_config", None) is not None:
        del merged.config.quantization_config
    merged.hf_quantizer = None
    merged.config.use_cache = True  # training loads turn the cache off; a served model wants it
    output_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    parameters = sum(p.numel() for p in merged.parameters())
    del model, merged
    gc.collect()

    export = {
        "adapter": str(adapter),
        "base": base,
        "kind": "reward" if facts["reward"] else "policy",
        "stage": facts["stage"],
        "merged_adapter": facts["provenance"].get("merged_adapter"),
        "dtype": str(dtype).removeprefix("torch."),
        "trained_in_4bit": facts["trained_in_4bit"],
        "probe_max_abs_diff": probe_diff,
        "parameters": parameters,
    }
    write_json(output_dir / EXPORT_FILE, export)
    write_json(output_dir / "metrics.json", export)
    write_resolved_config(output_dir, args)
    write_model_card(output_dir)
    auto_class = "AutoModelForSequenceClassification" if facts["reward"] else "AutoModelForCausalLM"
    print(f"[export] {adapter} merged into {base} -> {output_dir} ({parameters:,} parameters, "
          f"{export['dtype']}; probe max |diff| {probe_diff:.3g}); load it with {auto_class}")  # fmt: skip
    if args.push_to_hub:
        push(output_dir, args.push_to_hub, args.private)
    return export


def push(folder: Path, repo_id: str, private: bool) -> None:
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="clinalign export")
    except Exception as e:  # network or permission: one line, the local export stays
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClinalignError(f"upload to {repo_id} failed ({reason}); the export is complete in {folder}") from None
    print(f"[export] uploaded to https://huggingface.co/{repo_id}")


def make_parser() -> Parser:
    return Parser([ExportArgs])


if __name__ == "__main__":
    run(main, make_parser(), upstream_patches=True)
