"""rstar.lora: adapter files, and the file-level merge equals peft's own merge."""

from __future__ import annotations

import pytest
import torch

from rstar import lora


def _peft_model(model_dir, r=4, alpha=8):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_" in n:   # peft starts B at zero; make the delta visible
            p.data = torch.randn(p.shape, generator=g) * 0.05
    return model


def test_merge_into_matches_peft_merge(tmp_path, tiny_model_dir):
    pytest.importorskip("peft")
    from peft import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    model = _peft_model(tiny_model_dir)
    tensors = lora.from_peft_state(get_peft_model_state_dict(model))
    assert len(tensors) == 2 * 3 * model.config.num_hidden_layers
    path = lora.save_adapter(tmp_path / lora.LORA_FILE, tensors, r=4, alpha=8, base={"model": "tiny"}, dtype="float32")
    _, info = lora.read_adapter(path)
    assert info["scale"] == 2.0 and info["base"] == {"model": "tiny"}
    lora.merge_into(tiny_model_dir, path, tmp_path / "merged", dtype="float32")
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        want = model.merge_and_unload()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)(ids).logits
    assert torch.allclose(want, got, atol=1e-4)
    assert (tmp_path / "merged" / "tokenizer.json").is_file() or (tmp_path / "merged" / "tokenizer_config.json").is_file()


def test_adapter_errors_are_clear(tmp_path, tiny_model_dir):
    from safetensors.torch import save_file

    a = {"model.layers.0.self_attn.q_proj.lora_A": torch.zeros(4, 7),   # wrong input width
         "model.layers.0.self_attn.q_proj.lora_B": torch.zeros(128, 4)}
    path = lora.save_adapter(tmp_path / "bad.safetensors", a, r=4, alpha=8, base={})
    with pytest.raises(lora.AdapterError, match="do not fit"):
        lora.merge_into(tiny_model_dir, path, tmp_path / "out1")
    missing = {"model.layers.9.mlp.nope.lora_A": torch.zeros(4, 8), "model.layers.9.mlp.nope.lora_B": torch.zeros(8, 4)}
    path = lora.save_adapter(tmp_path / "missing.safetensors", missing, r=4, alpha=8, base={})
    with pytest.raises(lora.AdapterError, match="no weight for adapted modules"):
        lora.merge_into(tiny_model_dir, path, tmp_path / "out2")
    with pytest.raises(lora.AdapterError, match="needs both"):
        lora.save_adapter(tmp_path / "half.safetensors", {"m.lora_A": torch.zeros(2, 2)}, r=2, alpha=4, base={})
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(lora.AdapterError, match="not a readable LoRA adapter"):
        lora.read_adapter(tmp_path / "plain.safetensors")
    with pytest.raises(lora.AdapterError, match="not a LoRA"):
        lora.from_peft_state({"base_model.model.lm_head.weight": torch.zeros(1)})
