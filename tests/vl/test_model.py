"""The VL-T5 model: the visual embedding, the joint encoder input, DePT on the text only, generate, save/load."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, T5ForConditionalGeneration
from transformers.masking_utils import create_bidirectional_mask

from dept import DePTConfig
from dept.methods import PEFT_TYPES
from dept_vl.model import (
    VisualEmbedding,
    VLT5Config,
    VLT5ForConditionalGeneration,
    get_dept_vl_model,
    load_dept_vl_model,
    prepare_vl_model,
)
from tests.conftest import float32_paths, tiny_t5_config
from tests.vl.conftest import FEAT_DIM, N_REGIONS, make_regions

# A tiny random T5 often emits the same tokens whatever its input, so generate tests compare the scores too.
GENERATE_OPTIONS = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_scores=True,
                        return_dict_in_generate=True)
TEXTS = ["vqa: what color is the sky?", "nlvr: a red circle and a blue square and a green triangle", "caption:"]


def tokenize(tokenizer, texts, side="right"):
    tokenizer.padding_side = side
    try:
        return dict(tokenizer(texts, return_tensors="pt", padding=True))
    finally:
        tokenizer.padding_side = "right"


def attach_dept(model, tokenizer, **overrides):
    """DePT with a non-zero B, so A @ B really changes the text embeddings."""
    options = dict(num_virtual_tokens=3, r=2, max_length=24, prompt_init="text", task_type="seq2seq")
    options.update(overrides)
    dept_model = get_dept_vl_model(model, DePTConfig(**options), tokenizer)
    with torch.no_grad():
        dept_model.prompt_encoder.lora_embedding_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return dept_model


def capture_first_block_inputs(model):
    """Record (hidden_states, mask, position_bias) as the encoder's first block receives them."""
    seen = []
    handle = model.encoder.block[0].register_forward_pre_hook(lambda module, args: seen.append(args[:3]))
    return seen, handle


def decoder_logits(model, batch, regions, steps=3):
    decoder_input_ids = torch.zeros(batch["input_ids"].shape[0], steps, dtype=torch.long)
    with torch.no_grad():
        return model(**batch, **regions, decoder_input_ids=decoder_input_ids).logits


# ----------------------------------------------------------------------------------------------------------------
# The visual embedding


@torch.no_grad()
def set_visual_weights_by_hand(embedding: VisualEmbedding, d: int):
    embedding.feat_embedding.weight.copy_(torch.arange(d * FEAT_DIM).reshape(d, FEAT_DIM).sin() * 0.1)
    embedding.feat_embedding.bias.copy_(torch.linspace(-1, 1, d))
    embedding.box_embedding.weight.copy_(torch.arange(d * 5).reshape(d, 5).cos())
    embedding.box_embedding.bias.fill_(0.5)
    embedding.image_embedding.weight.copy_(torch.stack([torch.full((d,), 0.25), torch.full((d,), -0.75)]))
    for name, module in embedding.named_children():
        if name.endswith("layer_norm"):
            module.weight.copy_(torch.linspace(0.5, 2.0, d))


@pytest.mark.parametrize("individual_vis_layer_norm", [False, True])
def test_visual_embedding_matches_hand_computation(vl_config, individual_vis_layer_norm):
    config = VLT5Config.from_dict({**vl_config.to_dict(), "individual_vis_layer_norm": individual_vis_layer_norm})
    embedding = VisualEmbedding(config)
    d = config.d_model
    set_visual_weights_by_hand(embedding, d)
    feature = torch.linspace(-2, 3, FEAT_DIM)
    box = torch.tensor([0.1, 0.2, 0.5, 0.8])  # x1, y1, x2, y2
    box_with_area = torch.tensor([0.1, 0.2, 0.5, 0.8, 0.4 * 0.6])  # area = (x2 - x1) * (y2 - y1) = 0.24

    def rms_norm(v):  # T5's LayerNorm: no mean, no bias; eps inside the square root
        return v / torch.sqrt((v**2).mean() + config.layer_norm_epsilon) * torch.linspace(0.5, 2.0, d)

    feat = embedding.feat_embedding.weight @ feature + torch.linspace(-1, 1, d)
    pos = embedding.box_embedding.weight @ box_with_area + 0.5
    image = torch.full((d,), 0.25)
    expected = rms_norm(feat) + rms_norm(pos) + image if individual_vis_layer_norm else rms_norm(feat + pos + image)
    with torch.no_grad():
        actual = embedding(feature.view(1, 1, -1), box.view(1, 1, -1))[0, 0]
    torch.testing.assert_close(actual, expected, **float32_paths(expected))


def test_two_images_are_flattened_with_their_image_ids(vl_model):
    embedding = vl_model.visual_embedding
    regions = make_regions(2, seed=3)
    two_images = {key: torch.stack([value, value.flip(1)], dim=1) for key, value in regions.items()}  # (2, 2, 4, ..)
    image_ids = torch.tensor([0] * N_REGIONS + [1] * N_REGIONS)
    with torch.no_grad():
        stacked = embedding(two_images["vis_feats"], two_images["vis_boxes"])
        flat = embedding(two_images["vis_feats"].flatten(1, 2), two_images["vis_boxes"].flatten(1, 2), image_ids)
        same_regions_other_image = embedding(regions["vis_feats"], regions["vis_boxes"], torch.ones(4).long())
    assert stacked.shape == (2, 2 * N_REGIONS, vl_model.config.d_model)
    torch.testing.assert_close(stacked, flat, atol=0, rtol=0)
    expected = same_regions_other_image.flip(1)
    torch.testing.assert_close(stacked[:, N_REGIONS:], expected, **float32_paths(expected))
    assert not torch.allclose(stacked[:, :N_REGIONS], same_regions_other_image)  # the image id is seen


def test_bad_visual_inputs_get_clear_errors(vl_model, tokenizer):
    batch = tokenize(tokenizer, TEXTS[:2])
    regions = make_regions(2)
    with pytest.raises(ValueError, match="feat_dim=8"):
        vl_model(**batch, vis_feats=torch.randn(2, 4, 8), vis_boxes=regions["vis_boxes"], labels=batch["input_ids"])
    with pytest.raises(ValueError, match="need vis_boxes"):
        vl_model(**batch, vis_feats=regions["vis_feats"], labels=batch["input_ids"])
    with pytest.raises(ValueError, match="n_images=3"):
        vl_model(**batch, vis_feats=torch.randn(2, 3, 4, FEAT_DIM), vis_boxes=torch.rand(2, 3, 4, 4),
                 labels=batch["input_ids"])
    with pytest.raises(ValueError, match="3 examples but the text for 2"):
        vl_model(**batch, **make_regions(3), labels=batch["input_ids"])


# ----------------------------------------------------------------------------------------------------------------
# The joint encoder


def test_encoder_input_is_text_then_regions_and_mask_is_text_mask_then_ones(vl_model, tokenizer):
    batch = tokenize(tokenizer, TEXTS[:2])
    regions = make_regions(2)
    seen, handle = capture_first_block_inputs(vl_model)
    decoder_logits(vl_model, batch, regions)
    handle.remove()
    hidden, mask, position_bias = seen[0]
    with torch.no_grad():
        text = vl_model.shared(batch["input_ids"])
        visual = vl_model.visual_embedding(regions["vis_feats"], regions["vis_boxes"])
    expected = torch.cat([text, visual], dim=1)
    torch.testing.assert_close(hidden, expected, **float32_paths(expected))

    joint_mask = torch.cat([batch["attention_mask"], torch.ones(2, N_REGIONS, dtype=torch.long)], dim=1)
    expected_mask = create_bidirectional_mask(config=vl_model.encoder.config, inputs_embeds=hidden,
                                              attention_mask=joint_mask)
    torch.testing.assert_close(mask, expected_mask, atol=0, rtol=0)

    L = text.shape[1]  # T5's relative bias among the text; nothing between or among regions (VL-T5)
    text_bias = vl_model.encoder.block[0].layer[0].SelfAttention.compute_bias(L, L)
    torch.testing.assert_close(position_bias[:, :, :L, :L], text_bias, atol=0, rtol=0)
    assert position_bias.shape[-2:] == (L + N_REGIONS, L + N_REGIONS)
    assert torch.count_nonzero(position_bias[:, :, L:, :]) == 0 and torch.count_nonzero(position_bias[:, :, :, L:]) == 0


def test_without_regions_the_model_is_exactly_t5(vl_model, tokenizer):
    t5 = T5ForConditionalGeneration(tiny_t5_config(len(tokenizer))).eval()
    t5.load_state_dict({k: v for k, v in vl_model.state_dict().items() if "visual_embedding" not in k})
    batch = tokenize(tokenizer, TEXTS)
    decoder_input_ids = torch.tensor([[0, 5, 6]] * 3)
    with torch.no_grad():
        expected = t5(**batch, decoder_input_ids=decoder_input_ids).logits
        actual = vl_model(**batch, decoder_input_ids=decoder_input_ids).logits
    torch.testing.assert_close(actual, expected, **float32_paths(expected))


def test_region_order_does_not_matter(vl_model, tokenizer):
    batch = tokenize(tokenizer, TEXTS[:2])
    regions = make_regions(2)
    permuted = {key: value[:, [2, 0, 3, 1]] for key, value in regions.items()}
    with torch.no_grad():
        original = vl_model(**batch, **regions, decoder_input_ids=torch.zeros(2, 2).long())
        shuffled = vl_model(**batch, **permuted, decoder_input_ids=torch.zeros(2, 2).long())
    L = batch["input_ids"].shape[1]
    original_regions = original.encoder_last_hidden_state[:, L:][:, [2, 0, 3, 1]]
    torch.testing.assert_close(shuffled.encoder_last_hidden_state[:, L:], original_regions,
                               **float32_paths(original_regions))
    torch.testing.assert_close(shuffled.logits, original.logits, **float32_paths(original.logits))


def test_masked_regions_are_ignored(vl_model, tokenizer):
    batch = tokenize(tokenizer, TEXTS[:1])
    regions = make_regions(1, n_regions=6)
    first_four = {key: value[:, :4] for key, value in regions.items()}
    vis_attention_mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    expected = decoder_logits(vl_model, batch, first_four)
    masked = decoder_logits(vl_model, batch, {**regions, "vis_attention_mask": vis_attention_mask})
    torch.testing.assert_close(masked, expected, **float32_paths(expected))
    without_text_mask = {"input_ids": batch["input_ids"]}  # one unpadded example: its text mask is all ones
    masked = decoder_logits(vl_model, without_text_mask, {**regions, "vis_attention_mask": vis_attention_mask})
    torch.testing.assert_close(masked, expected, **float32_paths(expected))


@pytest.mark.parametrize("with_dept", [False, True])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_does_not_change_logits_with_regions(vl_model, tokenizer, side, with_dept):
    model = attach_dept(vl_model, tokenizer) if with_dept else vl_model
    regions = make_regions(3)
    batched = decoder_logits(model, tokenize(tokenizer, TEXTS, side), regions)
    for i, text in enumerate(TEXTS):
        alone = decoder_logits(model, tokenize(tokenizer, [text]), {k: v[i : i + 1] for k, v in regions.items()})
        torch.testing.assert_close(batched[i], alone[0], **float32_paths(alone[0]))


# ----------------------------------------------------------------------------------------------------------------
# DePT on the text only


def test_dept_changes_the_text_positions_only(vl_model, tokenizer):
    batch = tokenize(tokenizer, TEXTS[:2])
    regions = make_regions(2)
    seen, handle = capture_first_block_inputs(vl_model)
    decoder_logits(vl_model, batch, regions)
    dept_model = attach_dept(vl_model, tokenizer)
    decoder_logits(dept_model, batch, regions)
    handle.remove()
    plain, prompted = seen[0][0], seen[1][0]
    encoder, m, L = dept_model.prompt_encoder, dept_model.config.num_virtual_tokens, batch["input_ids"].shape[1]
    assert prompted.shape[1] == m + L + N_REGIONS

    torch.testing.assert_close(prompted[:, m + L :], plain[:, L:], atol=0, rtol=0)  # regions: untouched
    prompt = encoder.prompt_embeddings.detach().expand(2, -1, -1)
    torch.testing.assert_close(prompted[:, :m], prompt, atol=0, rtol=0)  # right padding: P first
    update = dept_model.config.scaling * (encoder.lora_embedding_A @ encoder.lora_embedding_B).detach()
    for row in range(2):
        n = int(batch["attention_mask"][row].sum())
        difference = prompted[row, m : m + n] - plain[row, :n]
        torch.testing.assert_close(difference, update[:n], **float32_paths(prompted[row, m : m + n]))  # E' - E
        torch.testing.assert_close(prompted[row, m + n : m + L], plain[row, n:L], atol=0, rtol=0)  # pads: no update
    assert dept_model.config.scaling == pytest.approx(8 / math.sqrt(2))


@pytest.mark.parametrize("num_beams", [1, 2])
@pytest.mark.parametrize("side", ["right", "left"])
def test_generate_through_dept_with_regions_does_not_depend_on_padding(vl_model, tokenizer, num_beams, side):
    dept_model = attach_dept(vl_model, tokenizer)
    regions = make_regions(3)
    batched = dept_model.generate(**tokenize(tokenizer, TEXTS, side), **regions, **GENERATE_OPTIONS,
                                  num_beams=num_beams)
    for i, text in enumerate(TEXTS):
        alone = dept_model.generate(**tokenize(tokenizer, [text]), **{k: v[i : i + 1] for k, v in regions.items()},
                                    **GENERATE_OPTIONS, num_beams=num_beams)
        assert torch.equal(batched.sequences[i], alone.sequences[0])
        if num_beams == 1:
            for batched_step, alone_step in zip(batched.scores, alone.scores):
                torch.testing.assert_close(batched_step[i], alone_step[0], **float32_paths(alone_step[0]))
        else:
            expected = alone.sequences_scores[0]
            torch.testing.assert_close(batched.sequences_scores[i], expected, **float32_paths(expected))


def test_greedy_generate_equals_step_by_step_argmax_of_forward(vl_model, tokenizer):
    dept_model = attach_dept(vl_model, tokenizer)
    batch = tokenize(tokenizer, TEXTS)
    regions = make_regions(3)
    generated = dept_model.generate(**batch, **regions, **GENERATE_OPTIONS)
    decoder_input_ids = torch.zeros(3, 1, dtype=torch.long)
    for step_scores in generated.scores:
        with torch.no_grad():
            logits = dept_model(**batch, **regions, decoder_input_ids=decoder_input_ids).logits[:, -1]
        logits[:, tokenizer.eos_token_id] = float("-inf")  # min_new_tokens
        torch.testing.assert_close(step_scores, logits, **float32_paths(logits))
        decoder_input_ids = torch.cat([decoder_input_ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated.sequences, decoder_input_ids)
    other_images = dept_model.generate(**batch, **make_regions(3, seed=7), **GENERATE_OPTIONS)
    assert not torch.allclose(other_images.scores[0], generated.scores[0])  # the regions reach the decoder


# ----------------------------------------------------------------------------------------------------------------
# Loading and saving


def test_t5_checkpoint_loads_with_fresh_deterministic_visual_layers(tmp_path, tokenizer, vl_config):
    torch.manual_seed(1)
    t5 = T5ForConditionalGeneration(tiny_t5_config(len(tokenizer)))
    t5.save_pretrained(tmp_path / "t5")
    model = VLT5ForConditionalGeneration.from_pretrained(tmp_path / "t5", feat_dim=FEAT_DIM)
    assert isinstance(model.config, VLT5Config) and model.config.feat_dim == FEAT_DIM
    state = model.state_dict()
    for key, value in t5.state_dict().items():
        assert torch.equal(state[key], value), key
    expected = VisualEmbedding(model.config)
    expected.reset_parameters(model.config.visual_init_seed)
    for key, value in expected.state_dict().items():
        assert torch.equal(model.visual_embedding.state_dict()[key], value), key
    bound = FEAT_DIM**-0.5
    assert 0.9 * bound < model.visual_embedding.feat_embedding.weight.abs().max() <= bound

    model.save_pretrained(tmp_path / "vl")
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "vl")
    assert type(reloaded) is VLT5ForConditionalGeneration
    for key, value in reloaded.state_dict().items():
        assert torch.equal(state[key], value), key


def test_dept_adapter_round_trip_with_visual_embedding_is_bit_exact(tmp_path, vl_model, tokenizer):
    vl_model.save_pretrained(tmp_path / "base")
    dept_model = attach_dept(vl_model, tokenizer)
    with torch.no_grad():  # as if trained
        for param in dept_model.base_model.visual_embedding.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(2)))
    dept_model.save_pretrained(tmp_path / "adapter")
    batch, regions = tokenize(tokenizer, TEXTS), make_regions(3)

    fresh_base = VLT5ForConditionalGeneration.from_pretrained(tmp_path / "base").eval()
    loaded = load_dept_vl_model(fresh_base, tmp_path / "adapter")
    saved, restored = dept_model.adapter_state_dict(), loaded.adapter_state_dict()
    assert saved.keys() == restored.keys() and any(key.startswith("modules.visual_embedding.") for key in saved)
    for key in saved:
        assert torch.equal(saved[key], restored[key]), key
    assert torch.equal(decoder_logits(loaded, batch, regions), decoder_logits(dept_model, batch, regions))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_adapter_with_frozen_visual_embedding_reloads_onto_the_same_base(tmp_path, vl_model, tokenizer):
    vl_model.save_pretrained(tmp_path / "base")
    dept_model = get_dept_vl_model(vl_model, DePTConfig(num_virtual_tokens=3, r=2, max_length=24), tokenizer,
                                   train_visual_embedding=False)
    dept_model.save_pretrained(tmp_path / "adapter")
    loaded = load_dept_vl_model(VLT5ForConditionalGeneration.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert loaded.modules_to_save == ()
    batch, regions = tokenize(tokenizer, TEXTS), make_regions(3)
    assert torch.equal(decoder_logits(loaded.eval(), batch, regions), decoder_logits(dept_model, batch, regions))


# ----------------------------------------------------------------------------------------------------------------
# Trainable parts and the four methods


def test_trainable_report_lists_the_visual_embedding_apart_from_dept(vl_model, tokenizer):
    d = vl_model.config.d_model
    counts = get_dept_vl_model(vl_model, DePTConfig(num_virtual_tokens=3, r=2, max_length=24), tokenizer)
    counts = counts.num_trainable_parameters()
    visual = (FEAT_DIM * d + d) + (5 * d + d) + 2 * d + d  # feat Linear, box Linear, 2 image rows, LayerNorm
    assert counts["prompt"] == 3 * d and counts["lora_embedding"] == 24 * 2 + 2 * d
    assert counts["visual_embedding"] == visual
    assert counts["total"] == 3 * d + 24 * 2 + 2 * d + visual


def test_visual_embedding_can_stay_frozen(vl_model, tokenizer):
    dept_model = get_dept_vl_model(vl_model, DePTConfig(num_virtual_tokens=3, r=2, max_length=24), tokenizer,
                                   train_visual_embedding=False)
    counts = dept_model.num_trainable_parameters()
    assert "visual_embedding" not in counts and counts["total"] == counts["dept"]
    assert not any(p.requires_grad for p in vl_model.visual_embedding.parameters())


def _expected_trainable(peft_type: str, name: str) -> bool:
    if peft_type == "FULL":
        return True
    if peft_type == "LORA":  # PEFT trains a copy of each module to save and keeps the original frozen
        return "lora_" in name or "visual_embedding.modules_to_save." in name
    if "visual_embedding" in name:
        return True
    if peft_type == "PROMPT_TUNING" and "lora_embedding" in name:  # r = 0: A and B are empty and frozen
        return False
    return name.startswith("prompt_encoder.")


@pytest.mark.parametrize("peft_type", PEFT_TYPES)
def test_each_method_trains_its_own_parameters_and_the_loss_falls(vl_model, tokenizer, peft_type):
    dept_config = DePTConfig(num_virtual_tokens=3, r=2, max_length=24, prompt_init="vocab")
    model = prepare_vl_model(vl_model, peft_type, tokenizer=tokenizer, dept_config=dept_config, lora_r=4)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in model.named_parameters() if _expected_trainable(peft_type, name)}
    if peft_type == "PROMPT_TUNING":
        assert model.config.r == 0 and model.prompt_encoder.lora_embedding_A.numel() == 0

    batch, regions = tokenize(tokenizer, TEXTS), make_regions(3)
    labels = tokenizer(["blue", "true", "a red circle"], return_tensors="pt", padding=True)["input_ids"]
    labels[labels == tokenizer.pad_token_id] = -100
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**batch, **regions, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    model.eval()
    generated = model.generate(**batch, **regions, max_new_tokens=3, num_beams=2)
    assert generated.shape[0] == 3


def test_unknown_method_is_refused(vl_model):
    with pytest.raises(ValueError, match="PROMPT_TUNING_LORA"):
        prepare_vl_model(vl_model, "ADAPTER")
