"""DePT trains in TRL's `SFTTrainer` (`dept.trl_trainer`) with TRL's default `SFTConfig` (bf16, gradient
checkpointing, fused AdamW, TRL's fused LM head): the loss is DePT's own, it falls, the saved folder holds the
adapter files only, and the adapter reloads to the same outputs and generations."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import LlamaForCausalLM
from transformers.training_args import OptimizerNames

from dept import DePTConfig, DePTModel, get_dept_model
from tests.conftest import tiny_llama_config

trl = pytest.importorskip("trl")
from dept.trl_trainer import DePTSFTTrainer  # noqa: E402

WEIGHT_FILES = {"model.safetensors", "pytorch_model.bin", "adapter_model.bin", "adapter_model.safetensors"}
TEXTS = ["the movie was great and the actors were wonderful", "a dull and boring film with terrible acting",
         "the actors were great", "a boring film"]
LABELS = ["1", "0", "1", "0"]


def build_base(tokenizer):
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(len(tokenizer))).eval()


def build_dept_model(tokenizer) -> DePTModel:
    config = DePTConfig(num_virtual_tokens=4, r=2, max_length=16, prompt_init="vocab", task_type="causal")
    return get_dept_model(build_base(tokenizer), config, tokenizer=tokenizer)


def sft_dataset(kind: str) -> Dataset:
    """A plain-text language-modelling set, or prompt-completion pairs (loss on the completion only)."""
    if kind == "text":
        return Dataset.from_list([{"text": f"{text} answer : {label}"} for text, label in zip(TEXTS * 2, LABELS * 2)])
    return Dataset.from_list([{"prompt": f"{text} answer :", "completion": f" {label}"}
                              for text, label in zip(TEXTS * 2, LABELS * 2)])


def sft_trainer(model, tokenizer, output_dir, data="text", **settings):
    """TRL's default SFTConfig, but for where the output goes, a few steps, DePT's rates and the CPU (TRL's default
    bf16 needs use_cpu=True on a machine without a GPU)."""
    arguments = dict(output_dir=str(output_dir), max_steps=8, learning_rate=0.3, per_device_train_batch_size=4,
                     report_to="none", logging_steps=1, use_cpu=True, max_length=16)
    arguments.update(settings)
    return DePTSFTTrainer(model, args=trl.SFTConfig(**arguments), train_dataset=sft_dataset(data),
                          eval_dataset=sft_dataset(data), processing_class=tokenizer, lora_embedding_lr=0.05)


def test_the_fused_lm_head_on_the_base_gives_depts_own_loss(tokenizer, tmp_path):
    model = build_dept_model(tokenizer)
    trainer = sft_trainer(model, tokenizer, tmp_path / "out", data="prompt_completion")
    assert "forward" in vars(model.base_model)  # TRL patched the Hugging Face model inside ...
    assert model.forward.__func__.__wrapped__ is type(model).forward  # ... and left DePT's forward as it was
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()  # a completion-only loss
    model.train()
    with torch.no_grad():
        fused = trainer.compute_loss(model, dict(batch))  # TRL's loss: its fused head, run behind the prompt
        own = model(**batch).loss  # DePT's forward with the full logits
    torch.testing.assert_close(fused, own, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("data", ["text", "prompt_completion"])
def test_sft_defaults_train_save_the_adapter_only_and_reload_to_the_same_generations(data, tokenizer, tmp_path):
    model = build_dept_model(tokenizer)
    trainer = sft_trainer(model, tokenizer, tmp_path / "out", data=data)
    args = trainer.args
    assert (args.optim, args.bf16, args.gradient_checkpointing) == (OptimizerNames.ADAMW_TORCH_FUSED, True, True)
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    trainer.save_model()
    assert trainer.evaluate()["eval_loss"] < loss_before
    names = {path.name for path in (tmp_path / "out").iterdir()}
    assert names & WEIGHT_FILES == {"adapter_model.safetensors"} and "adapter_config.json" in names

    fresh = DePTModel.from_pretrained(build_base(tokenizer), tmp_path / "out")
    prompts = tokenizer([f"{text} answer :" for text in TEXTS], padding=True, return_tensors="pt",
                        add_special_tokens=False)
    with trainer.accelerator.autocast():  # accelerate leaves the trained forward under TRL's bf16 autocast
        for dept_model in (model, fresh):
            dept_model.eval()
        with torch.no_grad():
            torch.testing.assert_close(fresh(**prompts).logits.float(), model(**prompts).logits.float(),
                                       rtol=1e-5, atol=1e-5)
    generated = model.generate(**prompts, max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, fresh.generate(**prompts, max_new_tokens=3, do_sample=False))


def test_only_decoder_only_dept_models_are_taken(t5_model, tokenizer, tmp_path):
    config = DePTConfig(num_virtual_tokens=2, r=1, max_length=8, prompt_init="vocab", task_type="seq2seq")
    with pytest.raises(ValueError, match="decoder-only"):
        sft_trainer(get_dept_model(t5_model, config), tokenizer, tmp_path / "out")
    with pytest.raises(TypeError, match="trl.SFTTrainer"):
        DePTSFTTrainer(build_base(tokenizer), args=trl.SFTConfig(str(tmp_path / "x"), use_cpu=True),
                       train_dataset=sft_dataset("text"), processing_class=tokenizer)
