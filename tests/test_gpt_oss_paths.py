"""GPT-OSS in 4-bit through the real entry scripts, on CPU: harmony SFT, then DPO from its adapter and a
reward model with it merged in (tiny GptOss, real o200k vocabulary); plus the dense 4-bit reward path.

Each script's `main` runs in this process. Every GPT-OSS model a script hands to
`clinalign.models.quantize_after_lora` (once all its adapters exist, before training) is recorded
with its trainable weights and its outputs per adapter at that moment, so the tests can look at the
trained model afterwards. The recorder calls the real function; nothing is mocked.

Sequences are kept short (batch 1 for the causal LM: the 201,088-token vocabulary makes every
token's logits cost about 0.8 MB): the pairs drop the long system message of the one prompt format;
`test_trl_renders_pairs_in_harmony_with_the_chat_template` checks how the full pair is rendered.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import runpy
from pathlib import Path

import pytest
import torch
from conftest import requires_harmony_vocab
from safetensors.torch import load_file

from clinalign import dpo, models, ppo
from clinalign.records import Record

REPO = Path(__file__).resolve().parents[1]
pytestmark = requires_harmony_vocab

MEDQA_ROWS = [
    ("Which vitamin deficiency causes scurvy?", ["Vitamin C", "Vitamin D", "Vitamin K", "Vitamin B12"], "A"),
    ("Which nerve supplies the deltoid?", ["Radial nerve", "Axillary nerve", "Ulnar nerve", "Median nerve"], "B"),
]
PAIR_QUESTIONS = [
    ("Which vitamin deficiency causes scurvy?", "Vitamin C", "Vitamin D"),
    ("Which nerve supplies the deltoid?", "Axillary nerve", "Radial nerve"),
    ("Which organ secretes insulin?", "Pancreas", "Liver"),
    ("Which electrolyte disorder peaks the T waves?", "Hyperkalemia", "Hyponatremia"),
]
GPT_OSS_4BIT = """
model_name_or_path: tiny-gpt-oss
dtype: float32
attn_implementation: eager
load_in_4bit: true
bnb_4bit_quant_type: nf4
use_bnb_nested_quant: true
bnb_4bit_quant_storage: float32
use_peft: true
lora_r: 4
lora_alpha: 8
lora_dropout: 0.0
lora_target_modules: [q_proj, k_proj, v_proj, o_proj]
lora_target_parameters: [mlp.experts.gate_up_proj, mlp.experts.down_proj]
max_steps: 2
learning_rate: 1.0e-2
logging_steps: 1
save_strategy: "no"
report_to: none
seed: 0
"""
PROBE = torch.tensor([[200006, 1428, 200008, 9906, 11, 1495, 382, 261, 1746, 13, 200007]])  # fixed ids, any text


def run_main(script: str, config: Path, *args: str):
    entry = runpy.run_path(str(REPO / script), run_name="gpt_oss_paths")
    return entry["main"](*entry["make_parser"]().parse(["--config", str(config), *args]))


def write_config(path: Path, extra: str) -> Path:
    path.write_text(GPT_OSS_4BIT + extra)
    return path


@dataclasses.dataclass
class Handed:
    """A model as `quantize_after_lora` got it: stacks quantized, trainable weights and outputs before training."""

    model: torch.nn.Module
    stacks: int
    trainable: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]


@torch.no_grad()
def probe_outputs(model) -> dict[str, torch.Tensor]:
    """Per adapter: the probe's token log-probs (causal LM) or its score (reward model)."""
    active, outputs = model.active_adapter, {}
    for adapter in model.peft_config:
        model.set_adapter(adapter)
        logits = model(input_ids=PROBE).logits.float()
        if logits.dim() == 3:
            logits = torch.log_softmax(logits[:, :-1], -1).gather(-1, PROBE[:, 1:, None]).squeeze(-1)
        outputs[adapter] = logits
    model.set_adapter(active)  # PEFT also makes the active adapter (alone) trainable again
    return outputs


def trainable_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def handed():
    """Record what each entry script hands to quantize_after_lora (scripts import it by name)."""
    seen: list[Handed] = []
    real = models.quantize_after_lora

    def recording(model, model_args):
        stacks = real(model, model_args)
        if model.config.model_type == "gpt_oss":
            seen.append(Handed(model, stacks, trainable_weights(model), probe_outputs(model)))
        return stacks

    with pytest.MonkeyPatch.context() as patch:
        for module in (models, dpo, ppo):
            patch.setattr(module, "quantize_after_lora", recording)
        yield seen


def trained(record: Handed):
    """The recorded model after training, without accelerate's autocast wrapper (as it was probed before)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(record.model, keep_fp32_wrapper=False)


def expert_stacks(model) -> dict[str, torch.Tensor]:
    """The packed storage of every quantized expert stack."""
    from harmony.gpt_oss import EXPERT_PARAMETERS, is_experts

    return {
        f"{name}.{stack}": module.parametrizations[stack].original
        for name, module in model.named_modules()
        if is_experts(module) and hasattr(module, "parametrizations")
        for stack in EXPERT_PARAMETERS
    }


def assert_4bit(model):
    """Attention projections are bitsandbytes NF4, both expert stacks of both layers packed 4-bit."""
    import bitsandbytes as bnb

    linear4bit = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]  # not PEFT's wrapper
    assert len(linear4bit) == 2 * 4, linear4bit
    stacks = expert_stacks(model)
    assert len(stacks) == 2 * 2
    for name, packed in stacks.items():
        values = 4 * 64 * 128 if name.endswith("gate_up_proj") else 4 * 64 * 64  # experts x hidden x (2x)inter
        assert packed.dtype == torch.float32 and packed.numel() * 4 * 2 == values, name  # 2 values a byte


def moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    return [n for n in before if not torch.equal(before[n], after[n])]


# ---- harmony rendering of preference pairs by TRL (no model) ----------------------------------------------


def short_pairs() -> list[dict]:
    """Preference rows built by clinalign.preferences, without the system message (short sequences)."""
    from clinalign.preferences import build_pairs, factuality_pairs

    records = [
        Record(id=f"p{i}", source="medmcqa", question=q, context=None, options={"A": a, "B": b}, answer="A", answer_text=a)
        for i, (q, a, b) in enumerate(PAIR_QUESTIONS)
    ]
    rows, report = build_pairs([factuality_pairs(records, source="medmcqa")])
    assert report["kept"] == len(rows) >= len(PAIR_QUESTIONS)
    for row in rows:
        row["prompt"] = [m for m in row["prompt"] if m["role"] != "system"]
    return rows


def test_trl_renders_pairs_in_harmony_with_the_chat_template():
    """DPO, RLOO and the RewardTrainer render our chat-message pairs with the tokenizer's chat template
    (clinalign's harmony template, which load_tokenizer gives every GPT-OSS tokenizer): exactly the tokens
    openai-harmony renders for the conversation, with the template's defaults (reasoning low, today's
    date), as SFT renders it."""
    from openai_harmony import Conversation, DeveloperContent, Message, ReasoningEffort, Role, SystemContent

    from clinalign.preferences import build_pairs, factuality_pairs
    from harmony.vocab import load_encoding

    record = Record(id="r", source="medmcqa", question=PAIR_QUESTIONS[0][0], context=None,
                    options={"A": "Vitamin C", "B": "Vitamin D"}, answer="A", answer_text="Vitamin C")  # fmt: skip
    row = build_pairs([factuality_pairs([record], source="medmcqa")])[0][0]
    (system, user), (chosen,) = row["prompt"], row["chosen"]
    tokenizer = models.load_tokenizer("tiny-gpt-oss")
    full = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=True, return_dict=True)["input_ids"]
    prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=True, return_dict=True, add_generation_prompt=True)
    prompt = prompt["input_ids"]

    conversation = Conversation.from_messages([
        Message.from_role_and_content(
            Role.SYSTEM,
            SystemContent.new()
            .with_reasoning_effort(ReasoningEffort.LOW)
            .with_conversation_start_date(datetime.date.today().isoformat()),
        ),  # harmony's default identity; reasoning low, the template's default and SFT's
        Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions(system["content"])),
        Message.from_role_and_content(Role.USER, user["content"]),
        Message.from_role_and_content(Role.ASSISTANT, chosen["content"]).with_channel("final"),
    ])  # fmt: skip
    encoding = load_encoding()
    expected = encoding.decode(encoding.render_conversation_for_training(conversation))
    instructions = system["content"]
    assert tokenizer.decode(full) == expected and f"{instructions}<|end|>" in expected
    assert full == encoding.render_conversation_for_training(conversation)
    assert "Reasoning: low" in expected and "<|start|>developer<|message|># Instructions" in expected
    # The prompt TRL splits off is a prefix ending where the model starts; the completion is the final channel.
    assert full[: len(prompt)] == prompt and tokenizer.decode(prompt).endswith("<|end|><|start|>assistant")
    assert tokenizer.decode(full[len(prompt) :]) == f"<|channel|>final<|message|>{chosen['content']}<|return|>"


# ---- SFT -> DPO and reward model, all in 4-bit ------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_stage(tmp_path_factory, handed):
    """sft/run.py: one harmony stage of 2 steps, 4-bit NF4 base, LoRA on attention and experts."""
    tmp = tmp_path_factory.mktemp("sft_4bit")
    data = tmp / "medqa.jsonl"
    with data.open("w") as f:
        for question, options, answer in MEDQA_ROWS:
            choices = dict(zip("ABCD", options, strict=True))
            f.write(json.dumps({"question": question, "options": choices, "answer_idx": answer,
                                "answer": choices[answer]}) + "\n")  # fmt: skip
    config = write_config(tmp / "sft.yaml", f"""
chat_format: harmony
curriculum:
  - {{name: medqa, data: {data}, dataset: medqa, max_steps: 2}}
eval_fraction: 0.0
output_dir: {tmp / "out"}
per_device_train_batch_size: 1
max_length: 512
""")
    summary = run_main("sft/run.py", config)
    (record,) = handed
    handed.clear()
    return tmp / "out" / "stages" / "1-medqa", summary[0], record


@pytest.mark.slow
def test_sft_trains_lora_on_4bit_attention_and_experts(sft_stage):
    stage, metrics, record = sft_stage
    assert record.stacks == 4  # quantized by the script, after the LoRA was attached
    model = trained(record)
    assert_4bit(model)
    assert metrics["global_step"] == 2 and metrics["train_examples"] == 2
    assert torch.isfinite(torch.tensor([metrics["train_loss_first"], metrics["train_loss_last"]])).all()

    after = trainable_weights(model)
    assert set(after) == set(record.trainable) and all("lora_" in n for n in after)
    assert any("experts" in n for n in after) and any("q_proj" in n for n in after)
    assert set(moved(record.trainable, after)) == set(after), "some LoRA weights did not move"
    assert not torch.allclose(probe_outputs(model)["default"], record.outputs["default"])

    # The adapter reloads (onto a 16-bit base here): every saved tensor is the trained one.
    saved = load_file(str(stage / "adapter_model.safetensors"))
    assert len(saved) == len(after)
    config = json.loads((stage / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    reloaded, _ = models.load_policy("tiny-gpt-oss", stage, dtype="float32")
    reloaded_lora = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
    assert len(reloaded_lora) == len(after)
    for name, tensor in reloaded_lora.items():
        assert torch.equal(tensor.float(), after[name]), name


@pytest.mark.slow
def test_dpo_from_the_4bit_sft_adapter_moves_the_policy_and_not_the_reference(sft_stage, handed, tmp_path):
    stage, _, sft_record = sft_stage
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in short_pairs()[:2]))
    config = write_config(tmp_path / "dpo.yaml", f"""
pairs: {pairs}
pairs_eval_fraction: 0.0
sft_adapter: {stage}
eval_data: []
safety_prompts: {REPO / "clinalign/sample_data/safety_prompts.jsonl"}
eval_max_safety_prompts: 1
eval_max_new_tokens: 2
kl_max_new_tokens: 2
kl_num_samples: 1
output_dir: {tmp_path / "out"}
beta: 0.1
loss_type: [sigmoid]
per_device_train_batch_size: 1
max_length: 512
gradient_checkpointing: false
""")
    metrics = run_main("rl/dpo.py", config)
    (record,) = handed
    handed.clear()
    assert record.stacks == 4 and set(record.model.peft_config) == {"default", "ref"}
    model = trained(record)  # rl/dpo.py unwrapped it already; this is a no-op then
    assert_4bit(model)
    # The reference at the start is the SFT policy as trained: the same NF4 weights and LoRA values. Not to
    # the bit: TRL kept the SFT LoRA in bf16 (QLoRA), the frozen copy computes in fp32, so they agree to
    # bf16 precision (2.3e-4 absolute here; 3e-3 relative on the CI machine).
    sft_policy = probe_outputs(trained(sft_record))["default"]
    torch.testing.assert_close(record.outputs["ref"], sft_policy, atol=1e-3, rtol=2**-7)
    after = probe_outputs(model)
    assert torch.equal(after["ref"], record.outputs["ref"])  # the frozen reference did not move
    assert not torch.allclose(after["default"], record.outputs["default"])  # the policy did

    losses = [h["loss"] for h in metrics["log_history"] if "loss" in h]
    assert len(losses) == 2 and all(map(torch.isfinite, torch.tensor(losses)))
    assert any("rewards/margins" in h for h in metrics["log_history"])
    saved, sft = load_file(str(tmp_path / "out" / "adapter_model.safetensors")), load_file(
        str(stage / "adapter_model.safetensors"))  # fmt: skip
    assert saved.keys() == sft.keys() and moved(sft, saved)


@pytest.mark.slow
def test_reward_model_on_4bit_gpt_oss_trains_reloads_and_scores(sft_stage, handed, tmp_path):
    from clinalign.rewards import load_reward_model, score_responses

    stage, _, _ = sft_stage
    rows = short_pairs()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = write_config(tmp_path / "rm.yaml", f"""
pairs: {pairs}
sft_adapter: {stage}
eval_fraction: 0.0
output_dir: {tmp_path / "out"}
per_device_train_batch_size: 2
max_length: 512
center_rewards_coefficient: 0.01
""")
    metrics = run_main("reward/train.py", config)
    (record,) = handed
    handed.clear()
    assert record.stacks == 4
    model = trained(record)
    assert_4bit(model)
    head = model.base_model.model.score.modules_to_save["default"]
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32  # the head stays 16-bit
    losses = [h["loss"] for h in metrics["train"] if "loss" in h]
    assert len(losses) == 2 and all(map(torch.isfinite, torch.tensor(losses)))

    after = trainable_weights(model)
    assert any("score" in n for n in after) and any("experts" in n for n in after) and any("q_proj" in n for n in after)
    assert set(moved(record.trainable, after)) == set(after), "some LoRA or head weights did not move"
    saved = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert any("score" in k for k in saved)
    provenance = json.loads((tmp_path / "out" / "clinalign_base.json").read_text())
    assert provenance["merged_adapter"] == str(stage) and provenance["quantization"]["load_in_4bit"] is True

    # Rebuilt from clinalign_base.json: the same 4-bit weights, so the same scores as the trained model.
    reloaded, tokenizer = load_reward_model(tmp_path / "out")
    assert_4bit(reloaded)
    prompts = [row["prompt"] for row in rows[:2]]
    responses = [row["chosen"][0]["content"] for row in rows[:2]]
    model.eval()
    expected = score_responses(model, tokenizer, prompts, responses)
    scores = score_responses(reloaded, tokenizer, prompts, responses)
    assert scores == pytest.approx(expected, abs=1e-5) and scores[0] != scores[1]


@pytest.mark.slow
def test_4bit_backbone_is_the_16bit_merge_quantized(sft_stage, tiny_sft_adapter):
    """The SFT adapter is merged in 16-bit and the sum quantized: NF4(W + BA), for GPT-OSS and dense models."""
    import bitsandbytes.functional as F

    from clinalign.rewards import reward_backbone
    from harmony.gpt_oss import nf4_config

    for base, adapter in (("tiny-gpt-oss", sft_stage[0]), ("tiny-llama", tiny_sft_adapter)):
        merged = reward_backbone(base, adapter, dtype="float32")
        policy, _ = models.load_policy(base, adapter, dtype="float32", attn_implementation="eager")
        ids = PROBE if base == "tiny-gpt-oss" else torch.tensor([[5, 6, 7, 8, 9]])
        with torch.no_grad():  # the merge is exact: the classifier's backbone is the SFT policy's
            torch.testing.assert_close(merged.model(ids).last_hidden_state,
                                       policy.get_base_model().model(ids).last_hidden_state, atol=1e-5, rtol=1e-4)  # fmt: skip
        quantized = reward_backbone(base, adapter, dtype="float32", quantization_config=nf4_config(torch.float32))
        assert type(quantized.score) is torch.nn.Linear and quantized.score.weight.dtype == torch.float32
        q_proj = quantized.model.layers[0].self_attn.q_proj
        assert type(q_proj).__name__ == "Linear4bit"
        weight = merged.model.layers[0].self_attn.q_proj.weight.detach()
        packed, state = F.quantize_4bit(weight, blocksize=q_proj.weight.blocksize, compress_statistics=True, quant_type="nf4")
        assert torch.equal(F.dequantize_4bit(q_proj.weight.data, q_proj.weight.quant_state),
                           F.dequantize_4bit(packed, state)), base  # fmt: skip


# ---- the dense 4-bit reward path (tiny Llama) ------------------------------------------------------------


@pytest.mark.slow
def test_dense_4bit_reward_model_trains_in_fp32_and_reloads_in_4bit(tiny_pairs, tiny_sft_adapter, tmp_path):
    from clinalign.errors import ClinalignError
    from clinalign.rewards import load_reward_model, score_responses

    out = tmp_path / "rm"
    entry = runpy.run_path(str(REPO / "reward" / "train.py"), run_name="gpt_oss_paths")
    args = ["--config", str(REPO / "configs/reward/tiny.yaml"), "--pairs", str(tiny_pairs), "--output_dir", str(out),
            "--sft_adapter", str(tiny_sft_adapter), "--max_steps", "1", "--eval_fraction", "0.5",
            "--load_in_4bit", "true", "--use_bnb_nested_quant", "true", "--bnb_4bit_quant_storage", "float32",
            "--bf16", "false"]  # fmt: skip
    metrics = entry["main"](*entry["make_parser"]().parse(args))  # fp32, no autocast: the head must stay fp32
    assert all(map(torch.isfinite, torch.tensor([h["loss"] for h in metrics["train"] if "loss" in h])))
    model, tokenizer = load_reward_model(out)
    assert model.get_base_model().is_loaded_in_4bit
    assert type(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    prompt = [{"role": "user", "content": "Is it safe to take ibuprofen with warfarin?"}]
    scores = score_responses(model, tokenizer, [prompt, prompt], ["No, ask your doctor.", "Yes, take lots."])
    assert scores[0] != scores[1]
    with pytest.raises(ClinalignError, match="trained in 4-bit with compute dtype float32"):
        load_reward_model(out, dtype="bfloat16")
