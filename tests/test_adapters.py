"""LoRA through PEFT on tiny GPT-2 and Llama models made here (pipeline/model/adapters.py, issue 31's first part):
the default layers per architecture, a frozen base, the adapter folder PEFT loads, and the merge checked against an
independent computation of W + (alpha / r) * B @ A."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from pipeline.errors import UserError
from pipeline.model.adapters import LoraSpec, adapter_weights, add_lora, base_fingerprint, merged_model, save_adapter, trainable_share


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


MAKERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}
IDS = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))


def train_a_little(model, steps: int = 3) -> None:
    """A few AdamW steps on the trainable parameters, so B is no longer zero and the adapter changes the logits."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("kind", MAKERS)
def test_default_layers_get_adapters_and_only_they_train(kind):
    model = MAKERS[kind]()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = add_lora(model, LoraSpec(r=4, alpha=8), base_name="base")
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in wrapped.named_parameters() if ".lora_A" in name}
    expected = {"gpt2": {"c_attn", "c_proj", "c_fc"}, "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}}
    assert adapted == expected[kind]
    trainable, total = trainable_share(wrapped)
    assert 0 < trainable < total / 4
    assert all("lora_" in name for name, p in wrapped.named_parameters() if p.requires_grad)
    train_a_little(wrapped)
    # Every base weight bit-identical after training; the adapters moved.
    after = {k.replace(".base_layer", ""): v for k, v in wrapped.get_base_model().state_dict().items() if "lora_" not in k}
    assert after.keys() == base.keys()
    for key, value in base.items():
        assert torch.equal(after[key], value), key
    assert any(v.abs().sum() > 0 for k, v in adapter_weights(wrapped).items() if "lora_B" in k)


def test_gpt2_conv1d_layers_are_adapted_in_their_own_orientation():
    """GPT-2's Conv1D stores weights as (in, out): PEFT needs fan_in_fan_out, or its delta has the wrong shape."""
    wrapped = add_lora(tiny_gpt2(), LoraSpec(r=4, alpha=8), base_name="base")
    assert wrapped.peft_config["default"].fan_in_fan_out is True
    layer = wrapped.get_base_model().transformer.h[0].attn.c_attn
    assert layer.lora_A["default"].weight.shape == (4, 32) and layer.lora_B["default"].weight.shape == (96, 4)


@pytest.mark.parametrize("kind", MAKERS)
def test_the_adapter_folder_loads_in_peft_and_the_merge_equals_an_independent_one(kind, tmp_path):
    from peft import PeftModel

    wrapped = add_lora(MAKERS[kind](), LoraSpec(r=4, alpha=8), base_name=str(tmp_path / "base"))
    train_a_little(wrapped)
    with torch.no_grad():
        adapter_logits = wrapped(input_ids=IDS).logits
    save_adapter(wrapped, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    import json

    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tmp_path / "base")

    loaded = PeftModel.from_pretrained(MAKERS[kind](), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, adapter_logits)

    merged = merged_model(MAKERS[kind](), tmp_path / "adapter", torch.float32).eval()
    assert not any("lora_" in name for name, _ in merged.named_parameters())  # a plain transformers model
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, adapter_logits, rtol=1e-5, atol=1e-5)

    # Independent of PEFT's merge: W + (alpha / r) * B @ A, transposed for GPT-2's Conv1D, from the saved weights.
    saved = adapter_weights(wrapped)
    plain = MAKERS[kind]().state_dict()
    for key, value in merged.state_dict().items():
        a_key = f"base_model.model.{key.removesuffix('.weight')}.lora_A.weight"
        if a_key not in saved:
            assert torch.equal(value, plain[key]), key
            continue
        delta = (8 / 4) * saved[a_key.replace("lora_A", "lora_B")] @ saved[a_key]
        expected = plain[key] + (delta.T if kind == "gpt2" else delta)
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)


def test_targets_that_name_no_layer_and_unknown_architectures_are_one_message():
    with pytest.raises(UserError, match=r"train.lora_targets: q_proj names no layer of this gpt2 model \(its layers include"):
        add_lora(tiny_gpt2(), LoraSpec(targets=("q_proj",)), base_name="base")
    model = tiny_gpt2()
    model.config.model_type = "mystery"
    with pytest.raises(UserError, match=r"train.lora_targets: no default layers for model type 'mystery'"):
        add_lora(model, LoraSpec(), base_name="base")
    wrapped = add_lora(model, LoraSpec(targets=("c_attn",)), base_name="base")  # named: any architecture
    assert wrapped.peft_config["default"].fan_in_fan_out  # from the layer's kind (Conv1D), not the model's name


def test_the_base_fingerprint_follows_weights_and_config_only(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "base")
    first = base_fingerprint(tmp_path / "base")
    (tmp_path / "base" / "README.md").write_text("notes")
    assert base_fingerprint(tmp_path / "base") == first
    tiny_gpt2(seed=1).save_pretrained(tmp_path / "base")
    assert base_fingerprint(tmp_path / "base") != first
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no weights"):
        base_fingerprint(tmp_path / "empty")
