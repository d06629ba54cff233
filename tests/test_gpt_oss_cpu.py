"""GPT-OSS on CPU: harmony SFT through TRL on a tiny GptOssForCausalLM with the real o200k vocabulary,
4-bit NF4 attention + experts with LoRA (bitsandbytes' CPU path), and the memory planner."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import requires_harmony_vocab

from clinalign.records import Record

RECORDS = [
    Record(
        id=f"cpu-{i}",
        source="medmcqa",
        question=question,
        context=None,
        options={"A": a, "B": b},
        answer="A",
        answer_text=a,
    )  # fmt: skip
    for i, (question, a, b) in enumerate(
        [
            ("Which vitamin deficiency causes scurvy?", "Vitamin C", "Vitamin D"),
            ("Which nerve supplies the deltoid?", "Axillary nerve", "Radial nerve"),
            ("First-line drug for anaphylaxis?", "Epinephrine", "Diphenhydramine"),
            ("Which organ secretes insulin?", "Pancreas", "Liver"),
        ]
    )
]


def sft_args(tmp_path, **overrides):
    from trl import SFTConfig

    values = dict(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, learning_rate=5e-3,
        completion_only_loss=True, use_cpu=True, bf16=False, report_to="none", logging_steps=1,
        save_strategy="no", dataset_num_proc=None, gradient_checkpointing=False, seed=0,
    )  # fmt: skip
    values.update(overrides)
    return SFTConfig(**values)


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.fixture(scope="module")
def harmony_dataset():
    from datasets import Dataset

    from harmony.render import render_for_training

    return Dataset.from_list([render_for_training(r, current_date="2026-01-15") for r in RECORDS])


@requires_harmony_vocab
def test_harmony_sft_trains_final_channel_then_generates_and_parses(tiny_gpt_oss, harmony_dataset, tmp_path):
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    from harmony.gpt_oss import lora_config
    from harmony.render import parse_completion, render_for_completion
    from harmony.vocab import gpt_oss_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt_oss, dtype=torch.float32, attn_implementation="eager")
    assert model.config.vocab_size == 201088
    trainer = SFTTrainer(
        model=model, args=sft_args(tmp_path), train_dataset=harmony_dataset,
        processing_class=gpt_oss_tokenizer(), peft_config=lora_config(r=4, alpha=8),
    )  # fmt: skip
    # TRL folds completion_mask into labels: -100 exactly on the prompt (system, developer, user, "<|start|>assistant").
    for row, source in zip(trainer.train_dataset, harmony_dataset, strict=True):
        expected = [t if m else -100 for t, m in zip(source["input_ids"], source["completion_mask"], strict=True)]
        assert row["labels"] == expected and row["input_ids"] == source["input_ids"]
    before = lora_weights(trainer.model)
    assert any("experts" in n for n in before) and any("q_proj" in n for n in before)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    after = lora_weights(trainer.model)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"LoRA weights that did not move: {unchanged}"

    prompt = torch.tensor([render_for_completion(RECORDS[0], current_date="2026-01-15")])
    trainer.model.eval()
    out = trainer.model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
    generated = out[0, prompt.shape[1] :].tolist()
    assert len(generated) >= 1
    parsed = parse_completion(generated)
    assert set(parsed) == {"analysis", "final", "complete"}
    assert parsed["complete"] is False or 200002 in generated or 200007 in generated


@requires_harmony_vocab
def test_trl_trains_the_whole_sequence_without_completion_only_loss(tiny_gpt_oss, harmony_dataset, tmp_path):
    """Why sft/run.py must set completion_only_loss=True for harmony examples (TRL 1.16 behaviour)."""
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    from harmony.vocab import gpt_oss_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt_oss, dtype=torch.float32)
    trainer = SFTTrainer(
        model=model, args=sft_args(tmp_path, completion_only_loss=None), train_dataset=harmony_dataset,
        processing_class=gpt_oss_tokenizer(),
    )  # fmt: skip
    assert trainer.train_dataset[0]["labels"] == harmony_dataset[0]["input_ids"]


def copy_dequantized_weights(peft_4bit, peft_reference) -> int:
    """Give the 16-bit reference the exact values the 4-bit model computes with; returns how many tensors."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    modules = dict(peft_reference.named_modules())
    copied = 0
    with torch.no_grad():
        for name, module in peft_4bit.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                modules[name].weight.copy_(F.dequantize_4bit(module.weight.data, module.weight.quant_state))
                copied += 1
            for parameter in getattr(module, "parametrizations", {}):
                getattr(modules[name], parameter).copy_(getattr(module, parameter))
                copied += 1
    return copied


def test_nf4_attention_and_experts_match_their_dequantized_weights_and_train(tiny_gpt_oss):
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from harmony.gpt_oss import load_gpt_oss, lora_config, quantize_experts

    model = load_gpt_oss(tiny_gpt_oss, dtype="float32")
    layer = model.model.layers[0]
    assert (
        type(layer.self_attn.q_proj).__name__ == "Linear4bit" and layer.self_attn.q_proj.weight.dtype == torch.float32
    )
    assert layer.mlp._z3_leaf  # ZeRO-3 gathers the MoE block whole

    # The trap of cpu_feasibility.md section 2: an eval forward would repack the 4-bit weights for good.
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    model.train()

    config = lora_config(r=4, alpha=8)
    config.init_lora_weights = False  # random B: the LoRA path contributes from the first step
    torch.manual_seed(0)
    peft_4bit = get_peft_model(model, config)
    reference = AutoModelForCausalLM.from_pretrained(tiny_gpt_oss, dtype=torch.float32, attn_implementation="eager")
    peft_ref = get_peft_model(reference, config)
    assert quantize_experts(peft_4bit, torch.float32) == 4  # after LoRA is attached
    stack = layer.mlp.experts.get_base_layer().parametrizations.gate_up_proj
    assert stack.original.dtype == torch.float32  # quant storage = compute dtype, so ZeRO-3 can shard it
    assert stack.original.numel() * 4 * 2 == 4 * 64 * 128  # two 4-bit values per byte, 4 bytes per float32
    assert copy_dequantized_weights(peft_4bit, peft_ref) == 2 * 4 + 2 * 2  # 2 layers x (4 projections + 2 stacks)
    set_peft_model_state_dict(peft_ref, get_peft_model_state_dict(peft_4bit))

    # Below the model's vocabulary: without the o200k file the tiny GPT-OSS has the small fallback one.
    vocab = min(1000, reference.config.vocab_size)
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in peft_4bit.parameters() if p.requires_grad], lr=1e-2)
    before = lora_weights(peft_4bit)
    for step in range(2):
        loss = peft_4bit(input_ids=ids, labels=ids).loss
        loss_ref = peft_ref(input_ids=ids, labels=ids).loss
        assert torch.isfinite(loss) and abs(loss.item() - loss_ref.item()) < 1e-4, (step, loss.item(), loss_ref.item())
        loss.backward()
        grads = {n: p.grad for n, p in peft_4bit.named_parameters() if p.requires_grad}
        assert len(grads) == 24 and all(
            g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values()
        )
        optimizer.step()
        optimizer.zero_grad()
        set_peft_model_state_dict(peft_ref, get_peft_model_state_dict(peft_4bit))
        # PEFT's LoRA proxy must come off after each forward, leaving only the 4-bit parametrization.
        experts = peft_4bit.base_model.model.model.layers[0].mlp.experts.get_base_layer()
        assert {name: len(s) for name, s in experts.parametrizations.items()} == {"gate_up_proj": 1, "down_proj": 1}
    after = lora_weights(peft_4bit)
    assert all(not torch.equal(before[n], after[n]) for n in before)
    # The adapter loads onto a 16-bit base (eval): same module nesting, same keys and shapes.
    missing = set_peft_model_state_dict(get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_gpt_oss), config),
                                        get_peft_model_state_dict(peft_4bit))  # fmt: skip
    assert not missing.unexpected_keys


def test_benchmark_path_from_config_quantize_lora_and_train():
    """benchmarks/gpt_oss_20b_gpu.py's sequence: random weights from a config, NF4, LoRA, a training step."""
    from peft import get_peft_model
    from transformers import GptOssConfig, GptOssForCausalLM

    from harmony.gpt_oss import keep_bnb_gradients_on_cpu, lora_config, quantize_experts, quantize_linear, quantize_nf4

    config = GptOssConfig(
        vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
    )  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    dense = GptOssForCausalLM(config).to(torch.bfloat16)
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        dense_logits = dense(input_ids=ids).logits.float()
    assert quantize_nf4(dense, torch.bfloat16) == {"linear": 8, "experts": 4, "cpu_patched": 8}
    assert quantize_nf4(dense, torch.bfloat16) == {"linear": 0, "experts": 0, "cpu_patched": 8}  # idempotent
    with torch.no_grad():
        quantized_logits = dense(input_ids=ids).logits.float()
    relative = (quantized_logits - dense_logits).norm() / dense_logits.norm()
    assert 0 < relative < 0.5  # NF4 rounding (about 0.2 on this random net); garbage weights give >= 1

    torch.manual_seed(0)
    model = GptOssForCausalLM(config).to(torch.bfloat16)
    assert quantize_linear(model, torch.bfloat16) == 8
    model = get_peft_model(model, lora_config(r=4, alpha=8))
    assert quantize_experts(model, torch.bfloat16) == 4
    keep_bnb_gradients_on_cpu(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert torch.isfinite(loss) and len(grads) == 24 and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(bool(g.abs().sum() > 0) for g in grads) >= 12  # B starts at zero: its gradients flow, A's may not yet


def test_lora_config_targets_attention_and_both_expert_stacks():
    from clinalign.errors import ClinalignError
    from harmony.gpt_oss import lora_config

    config = lora_config(r=8, alpha=16)
    assert config.target_modules == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert sorted(config.target_parameters) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert lora_config(experts=False, dropout=0.05).target_parameters is None
    with pytest.raises(ClinalignError, match="lora_dropout"):
        lora_config(dropout=0.05)


def test_mxfp4_checkpoint_is_dequantized_on_load(tmp_path, tiny_gpt_oss):
    """A tiny checkpoint in the published MXFP4 layout (blocks + scales) with hand-chosen values."""
    from safetensors.torch import load_file, save_file

    from harmony.gpt_oss import load_gpt_oss, quantize_experts

    folder = tmp_path / "mxfp4"
    folder.mkdir()
    config = json.loads((__import__("pathlib").Path(tiny_gpt_oss) / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                     "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    state = load_file(f"{tiny_gpt_oss}/model.safetensors")
    experts, hidden, inter = 4, 64, 64
    # FP4 (E2M1) code 0x2 = 1.0, code 0xA = -1.0; a scale byte of 128 = 2^(128-127) = 2.
    for i in range(2):
        prefix = f"model.layers.{i}.mlp.experts"
        for name, rows, cols in (("gate_up_proj", 2 * inter, hidden), ("down_proj", hidden, inter)):
            del state[f"{prefix}.{name}"]
            blocks = torch.full((experts, rows, cols // 32, 16), 0xA2, dtype=torch.uint8)  # low nibble first: 1, -1
            state[f"{prefix}.{name}_blocks"] = blocks
            state[f"{prefix}.{name}_scales"] = torch.full((experts, rows, cols // 32), 128, dtype=torch.uint8)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})

    model = load_gpt_oss(str(folder), dtype="bfloat16", load_in_4bit=False)
    gate_up = model.model.layers[0].mlp.experts.gate_up_proj
    assert gate_up.shape == (experts, hidden, 2 * inter) and gate_up.dtype == torch.bfloat16
    assert set(gate_up.unique().tolist()) == {2.0, -2.0}
    assert (gate_up[0, 0::2, 0] == 2.0).all() and (gate_up[0, 1::2, 0] == -2.0).all()

    quantized = load_gpt_oss(str(folder), dtype="bfloat16")
    assert type(quantized.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert quantize_experts(quantized, torch.bfloat16) == 4
    assert torch.equal(quantized.model.layers[0].mlp.experts.gate_up_proj, gate_up)  # +-2 is exact in NF4


def test_planner_weights_match_the_quantized_model_byte_for_byte(tiny_gpt_oss):
    from harmony.gpt_oss import load_gpt_oss, quantize_experts
    from harmony.plan import model_shape, weight_bytes

    model = load_gpt_oss(tiny_gpt_oss, dtype="bfloat16")
    quantize_experts(model, torch.bfloat16)
    actual = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    for module in model.modules():  # quantization statistics live outside the parameters
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        for parametrization in getattr(module, "parametrizations", {}).values():
            state = parametrization[0].quant_state
            actual += quant_state_bytes(state)
        if state is not None and not hasattr(module, "parametrizations"):
            actual += quant_state_bytes(state)
    predicted = weight_bytes(model_shape(json.loads(open(f"{tiny_gpt_oss}/config.json").read())), bits=4)
    assert predicted["total"] == actual, (predicted, actual)


def quant_state_bytes(state) -> int:
    total = state.absmax.numel() * state.absmax.element_size() + state.code.numel() * state.code.element_size()
    if state.nested:
        nested = state.state2
        total += nested.absmax.numel() * nested.absmax.element_size() + nested.code.numel() * nested.code.element_size()
        total += state.offset.numel() * state.offset.element_size()
    return total


MEDQA_ROWS = [
    ("Which vitamin deficiency causes scurvy?", ["Vitamin C", "Vitamin D", "Vitamin K", "Vitamin B12"], "A"),
    ("Which nerve supplies the deltoid?", ["Radial nerve", "Axillary nerve", "Ulnar nerve", "Median nerve"], "B"),
    ("First-line drug for anaphylaxis?", ["Diphenhydramine", "Prednisone", "Epinephrine", "Salbutamol"], "C"),
    ("Which organ secretes insulin?", ["Liver", "Spleen", "Kidney", "Pancreas"], "D"),
]

ZERO3_CONFIG = """
model_name_or_path: tiny-gpt-oss
dtype: float32
attn_implementation: eager
use_peft: true
lora_r: 4
lora_alpha: 8
lora_dropout: 0.0
lora_target_modules: [q_proj, k_proj, v_proj, o_proj]
lora_target_parameters: [mlp.experts.gate_up_proj, mlp.experts.down_proj]
chat_format: harmony
curriculum:
  - {{name: medqa, data: {data}, dataset: medqa, max_steps: 2}}
eval_fraction: 0.0
output_dir: {out}
per_device_train_batch_size: 1
max_length: 512
learning_rate: 1.0e-3
logging_steps: 1
save_strategy: "no"
report_to: none
"""


@pytest.mark.slow
@requires_harmony_vocab
def test_zero3_two_processes_train_harmony_lora_on_tiny_gpt_oss(tmp_path, run_script):
    """sft/run.py under DeepSpeed ZeRO-3, 2 CPU processes (gloo): LoRA on attention and experts, harmony data."""
    from safetensors.torch import load_file

    data = tmp_path / "medqa.jsonl"
    with data.open("w") as f:
        for question, options, answer in MEDQA_ROWS:
            choices = dict(zip("ABCD", options, strict=True))
            f.write(
                json.dumps({"question": question, "options": choices, "answer_idx": answer, "answer": choices[answer]})
                + "\n"
            )
    config = tmp_path / "tiny_gpt_oss_zero3.yaml"
    config.write_text(ZERO3_CONFIG.format(data=data, out=tmp_path / "out"))
    result = run_script(
        "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/zero3.yaml", "--num_processes", "2",
        "sft/run.py", "--config", config,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    stage = tmp_path / "out" / "stages" / "1-medqa"
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["train_examples"] == 4
    assert all(map(math.isfinite, (metrics["train_loss_first"], metrics["train_loss_last"])))
    adapter = json.loads((stage / "adapter_config.json").read_text())
    assert sorted(adapter["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    weights = load_file(str(stage / "adapter_model.safetensors"))
    expert_keys = [k for k in weights if "experts" in k]
    assert len(expert_keys) == 2 * 2 * 2  # 2 layers x 2 stacks x (A, B), gathered whole from the 2 ranks
    assert all(weights[k].numel() > 0 for k in weights)


@pytest.mark.slow
def test_benchmark_script_smoke_on_cpu(tmp_path, run_script):
    """The GPU benchmark's own code path (build, NF4, LoRA, timed steps, planner columns) on a small config."""
    config = {
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4,
        "num_experts_per_tok": 2, "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"],
        "pad_token_id": 0, "eos_token_id": 1,
        "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "original_max_position_embeddings": 4096, "truncate": False},
        "rope_theta": 150000,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "results.json"
    result = run_script(
        "benchmarks/gpt_oss_20b_gpu.py", "--config", tmp_path / "config.json", "--device", "cpu",
        "--seqs", "32", "64", "--steps", "1", "--lora_r", "4", "--json", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["seq"] for r in rows] == [32, 64]
    assert all(r["finite"] and r["tokens_per_s"] > 0 and r["plan_gib"] > 0 for r in rows)
    assert "plan parts (GiB): weights" in result.stdout


GPT_OSS_20B_SIZES = {
    "vocab_size": 201088, "hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": 24,
    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "num_local_experts": 32,
    "num_experts_per_tok": 4, "tie_word_embeddings": False,
}  # fmt: skip


def test_planner_lora_count_matches_peft(tiny_gpt_oss):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from harmony.gpt_oss import lora_config
    from harmony.plan import lora_numel, model_shape

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_gpt_oss), lora_config(r=4, alpha=8))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_numel(model_shape(json.loads(open(f"{tiny_gpt_oss}/config.json").read())), 4) == trainable == 13824
    # GPT-OSS-20B, r=16, by hand: attention 16*(2880+4096)*2 + 2*16*(2880+512) = 331,776 per layer;
    # experts 32*16*(2880+5760) + 32*16*(2880+2880) = 7,372,800 per layer; 24 layers.
    assert lora_numel(model_shape(GPT_OSS_20B_SIZES), 16) == 24 * (331_776 + 7_372_800)


def test_planner_cli_parts_add_up_and_sharding_helps(tmp_path, capsys):
    from harmony.plan import main

    config = tmp_path / "config.json"
    config.write_text(json.dumps(GPT_OSS_20B_SIZES))

    def plan(*args):
        assert main(["--model", str(config), "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)

    one = plan("--gpus", "1", "--zero", "0", "--bits", "4", "--seq", "2048")
    parts = ("weights", "lora+optimizer", "gradients", "activations", "buffers")
    assert sum(one[p] for p in parts) == one["total"] and one["fits"] is True  # about 22 GiB on an 80 GB card
    sharded = plan("--gpus", "8", "--zero", "3", "--bits", "4", "--seq", "2048")
    assert sharded["weights"] < one["weights"] / 3 and sharded["lora+optimizer"] < one["lora+optimizer"]
    sixteen = plan("--gpus", "1", "--zero", "0", "--bits", "16", "--seq", "2048", "--card", "a100-40gb")
    assert sixteen["weights"] > 3 * one["weights"] and sixteen["fits"] is False
    longer = plan("--gpus", "1", "--zero", "0", "--bits", "4", "--seq", "8192")
    assert longer["activations"] > 4 * one["activations"]  # the eager attention scores grow with seq^2
    assert main(["--model", str(config), "--gpus", "2", "--zero", "0"]) == 2  # ZeRO-0 is one GPU
    assert main(["--model", str(tmp_path / "missing.json")]) == 2
    assert "error:" in capsys.readouterr().err
