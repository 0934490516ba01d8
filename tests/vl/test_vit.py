"""Visual DePT on a timm ViT: VPT-shallow at r = 0, the DePT formula, patch grids, saving and the baselines."""

from __future__ import annotations

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from dept import AdapterMismatchError, ConfigError, DePTConfig, DePTModel
from dept_vl.vit import (
    DePTModelForImageClassification,
    TimmImageClassifier,
    prepare_vit_model,
    trainable_parameter_report,
    vit_dept_config,
)
from tests.conftest import float32_paths
from tests.vl.conftest import tiny_vit


def images(batch: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def hand_written_forward(vit, pixel_values, prompt, update=None):
    """VPT-shallow written out (Jia et al., 2022, eq. 1), plus DePT's update of the patch embeddings.

    patches = conv(image) + update; x = [cls ; reg ; patches] + pos; x = [prefix ; P ; patches]; blocks; norm;
    the head reads the class token (or the patches' mean for avg pooling), never the prompt outputs.
    """
    batch = pixel_values.shape[0]
    patches = vit.patch_embed.proj(pixel_values).flatten(2).transpose(1, 2)
    if update is not None:
        patches = patches + update
    prefix = [vit.cls_token.expand(batch, -1, -1)]
    if vit.reg_token is not None:
        prefix.append(vit.reg_token.expand(batch, -1, -1))
    x = torch.cat([*prefix, patches], dim=1) + vit.pos_embed
    n_prefix = vit.num_prefix_tokens
    x = torch.cat([x[:, :n_prefix], prompt.expand(batch, -1, -1), x[:, n_prefix:]], dim=1)
    for block in vit.blocks:
        x = block(x)
    x = vit.norm(x)
    pooled = x[:, 0] if vit.global_pool == "token" else x[:, n_prefix + prompt.shape[0]:].mean(dim=1)
    return vit.head(vit.fc_norm(pooled))


VARIANTS = {"class_token": {}, "registers_and_avg_pool": {"reg_tokens": 2, "global_pool": "avg"}}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_r0_equals_hand_written_vpt_shallow(variant):
    vit = tiny_vit(**VARIANTS[variant])
    model = prepare_vit_model(vit, "PROMPT_TUNING", dept_config=vit_dept_config(vit, num_virtual_tokens=5, r=0))
    pixel_values = images()

    logits = model(pixel_values).logits
    expected = hand_written_forward(vit, pixel_values, model.prompt_encoder.prompt_embeddings)

    assert model.config.r == 0 and model.num_trainable_parameters()["lora_embedding"] == 0
    torch.testing.assert_close(logits, expected, **float32_paths(expected))
    assert not torch.allclose(logits, vit(pixel_values), atol=1e-3)  # the prompt does change the output


def test_prompt_starts_as_vpt_prompts_uniform_within_xavier_bound():
    vit = tiny_vit()
    model = DePTModelForImageClassification(vit, vit_dept_config(vit, num_virtual_tokens=200, r=2))
    bound = (6.0 / (3 * 8 * 8 + 32)) ** 0.5
    prompt = model.prompt_encoder.prompt_embeddings
    assert prompt.abs().max() <= bound and prompt.abs().max() > 0.95 * bound
    assert abs(prompt.mean().item()) < 0.05 * bound


def test_dept_equals_the_formula_at_init_and_after_a_step():
    vit = tiny_vit()
    model = prepare_vit_model(vit, "PROMPT_TUNING_LORA", dept_config=vit_dept_config(vit, num_virtual_tokens=3, r=4))
    pixel_values, labels = images(), torch.tensor([0, 1, 2])
    encoder = model.prompt_encoder

    def formula():
        update = model.config.scaling * encoder.lora_embedding_A @ encoder.lora_embedding_B  # (s, d)
        return hand_written_forward(vit, pixel_values, encoder.prompt_embeddings, update)

    model.eval()
    assert encoder.lora_embedding_B.abs().sum() == 0  # B = 0 at init: A @ B adds nothing yet
    expected = formula()
    torch.testing.assert_close(model(pixel_values).logits, expected, **float32_paths(expected))

    model.train()
    optimizer = torch.optim.AdamW(model.optimizer_param_groups(learning_rate=0.1, lora_embedding_lr=0.1))
    model(pixel_values, labels=labels).loss.backward()
    optimizer.step()

    model.eval()
    assert encoder.lora_embedding_B.abs().sum() > 0
    with torch.no_grad():
        expected = formula()
        torch.testing.assert_close(model(pixel_values).logits, expected, **float32_paths(expected))
        update = model.config.scaling * encoder.lora_embedding_A @ encoder.lora_embedding_B
        assert not torch.allclose(formula(), hand_written_forward(vit, pixel_values, encoder.prompt_embeddings,
                                                                  torch.zeros_like(update)), atol=1e-4)


def test_frozen_backbone_stays_in_eval_mode_while_training_and_only_p_a_b_head_get_gradients():
    vit = tiny_vit(drop_rate=0.5, drop_path_rate=0.5)
    model = DePTModelForImageClassification(vit, vit_dept_config(vit, num_virtual_tokens=2, r=2))
    model.train()
    assert model.training and not vit.blocks.training and vit.head.training
    first, second = model(images()).logits, model(images()).logits
    torch.testing.assert_close(first, second)  # no dropout nor drop-path in the frozen ViT
    model(images(), labels=torch.tensor([0, 1, 2])).loss.backward()
    with_grad = sorted(name for name, p in model.named_parameters() if p.grad is not None)
    assert with_grad == ["base_model.head.bias", "base_model.head.weight", "prompt_encoder.lora_embedding_A",
                         "prompt_encoder.lora_embedding_B", "prompt_encoder.prompt_embeddings"]


def test_head_is_reported_apart_from_p_and_a_b():
    vit = tiny_vit()
    model = DePTModelForImageClassification(vit, vit_dept_config(vit, num_virtual_tokens=4, r=2))
    counts = model.num_trainable_parameters()
    assert counts["prompt"] == 4 * 32 and counts["lora_embedding"] == 16 * 2 + 2 * 32
    assert counts["head"] == 32 * 3 + 3 and counts["total"] == counts["dept"] + counts["head"]
    assert trainable_parameter_report(model) == {"prompt": 128, "lora_embedding": 96, "head": 99, "total": 323,
                                                 "other": 0}


# ----------------------------------------------------------------------------------------------------------------
# Image sizes and A's rows


def test_a_has_one_row_per_patch_and_another_length_is_refused():
    vit = tiny_vit()
    with pytest.raises(ConfigError, match="max_length must be the model's 16 patches"):
        DePTModelForImageClassification(vit, DePTConfig(num_virtual_tokens=2, r=2, max_length=20,
                                                        prompt_init="random", task_type="cls"))


def test_text_prompt_init_is_refused_for_images():
    vit = tiny_vit()
    with pytest.raises(ConfigError, match="images have none"):
        DePTModelForImageClassification(vit, vit_dept_config(vit, num_virtual_tokens=2, r=2, prompt_init="text"))


def test_another_image_size_is_refused_clearly_without_dynamic_img_size():
    vit = tiny_vit()
    model = DePTModelForImageClassification(vit, vit_dept_config(vit, num_virtual_tokens=2, r=2))
    with pytest.raises(ValueError, match="are 48 x 48 but this ViT takes 32 x 32.*dynamic_img_size=True"):
        model(images(size=48))


def test_dynamic_img_size_at_the_native_size_matches_the_fixed_size_model():
    fixed, dynamic = tiny_vit(), tiny_vit(dynamic_img_size=True)
    dynamic.load_state_dict(fixed.state_dict())
    models = [DePTModelForImageClassification(vit, vit_dept_config(vit, num_virtual_tokens=2, r=3))
              for vit in (fixed, dynamic)]
    with torch.no_grad():
        models[1].prompt_encoder.lora_embedding_B.normal_()  # a non-zero update, the same in both
        models[0].prompt_encoder.lora_embedding_B.copy_(models[1].prompt_encoder.lora_embedding_B)
    expected = models[1](images()).logits
    torch.testing.assert_close(models[0](images()).logits, expected, **float32_paths(expected))


@pytest.mark.parametrize("size", [24, 48, 56])
def test_dynamic_img_size_resamples_a_b_on_the_patch_grid_as_the_position_embedding(size):
    """With A @ B = -(patch position embedding), the two cancel at the model's own grid; they keep cancelling at
    any other grid only if the update is resampled to each patch exactly as timm resamples pos_embed."""
    vit = tiny_vit(dynamic_img_size=True)
    s, d = 16, 32
    model = DePTModelForImageClassification(vit, vit_dept_config(vit, num_virtual_tokens=2, r=s))
    with torch.no_grad():
        model.prompt_encoder.lora_embedding_A.copy_(torch.eye(s))
        model.prompt_encoder.lora_embedding_B.copy_(-vit.pos_embed[0, 1:] / model.config.scaling)
    pixel_values = images(size=size)

    with torch.no_grad():
        tokens = model.embed_patches(pixel_values)
        patches = vit.patch_embed(pixel_values).flatten(1, 2)  # (batch, grid_h * grid_w, d), no positions
    grid = size // 8
    assert tokens.shape == (3, 1 + 2 + grid * grid, d)
    torch.testing.assert_close(tokens[:, 3:], patches, **float32_paths(patches))
    resampled = resample_abs_pos_embed(vit.pos_embed, new_size=[grid, grid], num_prefix_tokens=1)
    torch.testing.assert_close(tokens[:, 0], (vit.cls_token[0, 0] + resampled[0, 0]).expand(3, -1))
    torch.testing.assert_close(tokens[:, 1:3], model.prompt_encoder.prompt_embeddings.expand(3, -1, -1))


# ----------------------------------------------------------------------------------------------------------------
# Saving, loading, baselines


def test_saved_adapter_reloads_with_its_head_and_gives_the_same_logits(tmp_path):
    vit = tiny_vit()
    model = DePTModelForImageClassification(vit, vit_dept_config(vit, num_virtual_tokens=2, r=2))
    with torch.no_grad():
        model.prompt_encoder.lora_embedding_B.normal_()
        vit.head.weight.normal_()
    expected = model(images()).logits
    model.save_pretrained(tmp_path)

    reloaded = DePTModelForImageClassification.from_pretrained(tiny_vit(), tmp_path)
    torch.testing.assert_close(reloaded(images()).logits, expected, atol=0, rtol=0)
    assert reloaded.config.base_model_type == "timm_vision_transformer" and reloaded.modules_to_save == ("head",)

    with pytest.raises(AdapterMismatchError, match="token_dim=32"):
        DePTModelForImageClassification.from_pretrained(tiny_vit(embed_dim=64), tmp_path)
    with pytest.raises(ConfigError, match="max_length must be the model's 36 patches"):
        DePTModelForImageClassification.from_pretrained(tiny_vit(img_size=48), tmp_path)


def test_a_text_model_refuses_a_vit_adapter(tmp_path, bert_model):
    vit = tiny_vit()
    DePTModelForImageClassification(vit, vit_dept_config(vit, num_virtual_tokens=2, r=2)).save_pretrained(tmp_path)
    with pytest.raises(AdapterMismatchError, match="was saved for a base model with"):
        DePTModel.from_pretrained(bert_model, tmp_path)
    with pytest.raises(ConfigError, match="needs a timm VisionTransformer"):
        DePTModelForImageClassification.from_pretrained(bert_model, tmp_path)


def test_lora_baseline_trains_qkv_and_the_head_only():
    model = prepare_vit_model(tiny_vit(), "LORA", lora_r=4)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or ".head." in name for name in trainable)
    assert sum("qkv.lora_A" in name for name in trainable) == 2  # one per block
    report = trainable_parameter_report(model)
    assert report["head"] == 99 and report["other"] == 2 * (4 * 32 + 96 * 4)
    loss = model(pixel_values=images(), labels=torch.tensor([0, 1, 2])).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_full_fine_tuning_trains_every_weight():
    vit = tiny_vit()
    model = prepare_vit_model(vit, "FULL")
    assert isinstance(model, TimmImageClassifier)
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model(images()).logits, vit(images()))


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        vit = tiny_vit()
        model = DePTModelForImageClassification(vit, vit_dept_config(vit, num_virtual_tokens=2, r=2))
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        model(images(), labels=torch.tensor([0, 1, 2])).loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, **float32_paths(plain))  # a recomputed forward
