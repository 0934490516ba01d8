"""A ViT tuned with visual DePT inside VL-T5: its features, both adapters training, the saved pair, bad flags.

The ViT is a tiny timm `vit_tiny_patch16_224` (64 px, 16 px patches: a 4 x 4 grid of 32-d regions) saved with
timm's `save_for_hf`, so the pipeline loads it as a user's would (`timm.create_model("local-dir:...",
pretrained=True)`), and the data are `scripts.synthetic_vl_data` images (see `tests/vl/test_pipeline.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models import save_for_hf
from transformers import AutoTokenizer

from dept import DePTConfig
from dept.config import ConfigError
from dept.errors import FlagError
from dept_vl.cli import train as main
from dept_vl.data import VLCollator, VLImageCollator, task_file_paths, tokenize_vl_rows
from dept_vl.evaluate import check_task_fits_adapter
from dept_vl.features import FeatureStore, GridFeatureExtractor, ImagePixels, extract_to_h5
from dept_vl.model import prepare_vl_model
from dept_vl.modeling import load_vl_base_model
from dept_vl.tasks import TaskSources, load_task_splits
from dept_vl.vision_backbone import (
    VISION_ADAPTER_DIR,
    VisionBackboneArguments,
    VLT5WithVisionBackbone,
    attach_vision_backbone,
    create_vision_backbone,
    vit_transform,
)
from dept_vl.vit import DePTModelForImageClassification
from tests.conftest import VLFixture, build_vl_fixture, float32_paths
from tests.vl.conftest import predictions, read_json

pytestmark = pytest.mark.xdist_group("vision_backbone")  # shares module-scoped runs: one worker (--dist loadgroup)

TINY_VIT = dict(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2)
VIT_DIM, GRID_CELLS = 32, 16


@dataclass
class BackboneFixture:
    vl: VLFixture
    vit_dir: Path  # the tiny ViT as timm saves it
    vit_features: Path  # its frozen grid features of every image, as scripts/extract_features.py writes them

    def argv(self, tasks: str, output_dir: Path, *extra: str) -> list[str]:
        return self.vl.argv(tasks, output_dir, "--feature_file", "", "--image_dir", str(self.vl.root),
                            "--vision_backbone", str(self.vit_dir), "--vision_prefix_length", "2", "--vision_r", "2",
                            *extra)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> BackboneFixture:
    directory = tmp_path_factory.mktemp("vision_backbone")
    vl = build_vl_fixture(directory, n_images=10)
    torch.manual_seed(0)
    vit_dir = directory / "vit"
    save_for_hf(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY_VIT), vit_dir)
    vit_features = directory / "vit_features.h5"
    extract_to_h5(vl.root, vit_features, GridFeatureExtractor(str(vit_dir), pretrained=True), progress=False)
    return BackboneFixture(vl, vit_dir, vit_features)


def rows(fixture: BackboneFixture, tasks: list[str], split: str = "validation"):
    """8 tokenized rows of `tasks`, the first and last 4 (NLVR2 rows have two images), for the collators."""
    data = load_task_splits(tasks, TaskSources(**task_file_paths(fixture.vl.root)), [split])[split]
    tokenizer = AutoTokenizer.from_pretrained(fixture.vl.model_dir)
    return tokenizer, tokenize_vl_rows(data, tokenizer, 24, 24).select([0, 1, 2, 3, *range(len(data) - 4, len(data))])


def pair_model(fixture: BackboneFixture, vision_peft_type: str) -> VLT5WithVisionBackbone:
    """The tiny ViT (frozen, or with a fresh visual DePT adapter) next to text DePT on the tiny VL-T5."""
    vit = create_vision_backbone(str(fixture.vit_dir))
    vl_base = load_vl_base_model(str(fixture.vl.model_dir), feat_dim=VIT_DIM)
    text = prepare_vl_model(vl_base, "PROMPT_TUNING_LORA",
                            dept_config=DePTConfig(num_virtual_tokens=2, r=2, max_length=24, prompt_init="vocab"))
    args = VisionBackboneArguments(str(fixture.vit_dir), vision_peft_type, vision_prefix_length=2, vision_r=2)
    return attach_vision_backbone(text, vit, args)


# ------------------------------------------------------------------------------------------------ the features


def test_frozen_vit_features_computed_in_the_model_equal_its_extracted_hdf5_features(backbone):
    tokenizer, batch_rows = rows(backbone, ["vqa", "nlvr"])  # one- and two-image rows in one batch
    model = pair_model(backbone, "NONE")
    sources = {task: ImagePixels(backbone.vl.root, vit_transform(model.vit)) for task in ("vqa", "nlvr")}
    pixels_batch = VLImageCollator(tokenizer, sources, n_regions=model.n_regions)(list(batch_rows))
    stored = FeatureStore(backbone.vit_features)
    stored_batch = VLCollator(tokenizer, {"vqa": stored, "nlvr": stored})(list(batch_rows))

    computed = model.visual_inputs(pixels_batch["pixel_values"], pixels_batch["vis_attention_mask"])

    assert computed["vis_feats"].shape == stored_batch["vis_feats"].shape == (8, 2, GRID_CELLS, VIT_DIM)
    assert stored_batch["vis_attention_mask"][:, 1].eq(0).any()  # some rows really have no second image
    torch.testing.assert_close(computed["vis_attention_mask"], stored_batch["vis_attention_mask"], atol=0, rtol=0)
    stored = stored_batch["vis_feats"]
    torch.testing.assert_close(computed["vis_feats"], stored, **float32_paths(stored))
    torch.testing.assert_close(computed["vis_boxes"] * computed["vis_attention_mask"][..., None],
                               stored_batch["vis_boxes"], atol=1e-6, rtol=0)
    assert model.vision_parameter_report() == {"vision_prompt": 0, "vision_lora_embedding": 0}


def test_vision_dept_and_text_dept_both_receive_gradients_and_the_frozen_vit_none(backbone):
    tokenizer, batch_rows = rows(backbone, ["vqa"], split="train")
    model = pair_model(backbone, "PROMPT_TUNING_LORA").train()
    sources = {"vqa": ImagePixels(backbone.vl.root, vit_transform(model.vit))}
    batch = VLImageCollator(tokenizer, sources, n_regions=model.n_regions)(list(batch_rows))
    batch.pop("references")

    model(**batch).loss.backward()

    for name, encoder in (("text", model.vl_model.prompt_encoder), ("vision", model.vision.prompt_encoder)):
        # B starts at 0, so A's gradient is 0 at step 0; P and B get one.
        assert encoder.prompt_embeddings.grad.abs().sum() > 0, name
        assert encoder.lora_embedding_B.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.vit.parameters())
    groups = {group["name"]: group for group in model.optimizer_param_groups(0.3, 0.01)}
    assert {"prompt", "lora_embedding", "modules_to_save", "vision_prompt", "vision_lora_embedding"} == set(groups)
    assert groups["vision_prompt"]["params"] == [model.vision.prompt_encoder.prompt_embeddings]


# ------------------------------------------------------------------------------------------------ train, save, reload


def test_pair_trains_with_falling_loss_saves_both_adapters_and_reloads_to_the_same_predictions(backbone, tmp_path):
    output_dir = tmp_path / "run"
    results = main(backbone.argv("vqa", output_dir, "--max_steps", "10", "--eval_steps", "10", "--save_steps", "10",
                                 "--do_eval", "false", "--lora_embedding_lr", "0.05",
                                 "--vision_learning_rate", "0.05", "--vision_lora_embedding_lr", "0.05"))

    losses = [entry["loss"] for entry in read_json(output_dir / "trainer_state.json")["log_history"] if "loss" in entry]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    text = load_file(output_dir / "adapter_model.safetensors")
    vision = load_file(output_dir / VISION_ADAPTER_DIR / "adapter_model.safetensors")
    assert text["lora_embedding_B"].abs().sum() > 0 and vision["lora_embedding_B"].abs().sum() > 0  # both trained
    assert vision["prompt_embeddings"].shape == (2, VIT_DIM) and vision["lora_embedding_A"].shape == (GRID_CELLS, 2)
    record = read_json(output_dir / "training_task.json")
    assert record["feat_dim"] == VIT_DIM and "image_features" not in record
    assert record["vision_backbone"]["backbone"] == str(backbone.vit_dir)
    assert record["vision_backbone"]["adapter"] == VISION_ADAPTER_DIR
    assert record["trainable_parameters"]["vision_lora_embedding"] == GRID_CELLS * 2 + 2 * VIT_DIM

    reloaded_dir = tmp_path / "reloaded"
    reloaded = main(backbone.argv("vqa", reloaded_dir, "--peft_model_id", str(output_dir), "--do_train", "false",
                                  "--do_eval", "false", "--vision_prefix_length", "2"))
    assert predictions(reloaded_dir) == predictions(output_dir)
    assert reloaded["test_loss"] == pytest.approx(results["test_loss"], abs=1e-6)  # sensitive to both adapters

    # The pair from Python: the same test loss as the run's, and not the loss without the vision adapter.
    tokenizer, batch_rows = rows(backbone, ["vqa"], split="test")
    vit = create_vision_backbone(str(backbone.vit_dir))
    pair = VLT5WithVisionBackbone.from_pretrained(vit, load_vl_base_model(str(backbone.vl.model_dir), VIT_DIM),
                                                  output_dir)
    assert isinstance(pair.vision, DePTModelForImageClassification) and not pair.training
    sources = {"vqa": ImagePixels(backbone.vl.root, vit_transform(vit))}
    batch = VLImageCollator(tokenizer, sources, n_regions=pair.n_regions)(list(batch_rows))
    batch.pop("references")
    with torch.no_grad():
        loss = pair(**batch).loss
        without_vision = VLT5WithVisionBackbone(vit, pair.vl_model)(**batch).loss
    assert not torch.isclose(loss, without_vision, atol=1e-4)

    with pytest.raises(ConfigError, match="dept-eval does not load"):  # it would read frozen features
        check_task_fits_adapter("vqa", record, str(output_dir))
    with pytest.raises(FlagError, match="--vision_backbone"):  # the pair's text adapter alone would read other features
        main(backbone.vl.argv("vqa", tmp_path / "text_only", "--peft_model_id", str(output_dir), "--do_train", "false"))
    with pytest.raises(ConfigError, match="weights of .* differ from those"):  # other random weights
        main(backbone.argv("vqa", tmp_path / "random", "--peft_model_id", str(output_dir), "--do_train", "false",
                           "--pretrained", "false", "--seed", "1"))
    with pytest.raises(FlagError, match="--vision_r 3 \\(the pair has 2\\)"):
        main(backbone.argv("vqa", tmp_path / "resized", "--peft_model_id", str(output_dir), "--vision_r", "3"))


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(("extra", "error", "match"), [
    (["--feature_file", "features.h5"], FlagError, "--feature_file features.h5 would be ignored"),
    (["--image_dir", ""], FlagError, "pass --image_dir"),
    (["--backbone", "resnet18"], FlagError, "Drop --backbone"),
    (["--image_size", "40"], ConfigError, "not a multiple of the patch size 16 x 16"),
])
def test_contradicting_flags_and_a_size_the_vit_refuses_are_named(backbone, tmp_path, extra, error, match):
    with pytest.raises(error, match=match):
        main(backbone.argv("vqa", tmp_path / "run", *extra))
    assert not (tmp_path / "run").exists()


def test_vision_flags_without_a_backbone_and_a_cnn_backbone_are_refused(backbone, tmp_path):
    with pytest.raises(FlagError, match="--vision_r set the ViT tuned inside the model: pass --vision_backbone"):
        main(backbone.vl.argv("vqa", tmp_path / "run", "--vision_r", "4"))
    with pytest.raises(ConfigError, match="needs a timm VisionTransformer"):
        create_vision_backbone("resnet18", pretrained=False)


def test_images_of_another_size_than_the_vit_takes_are_refused(backbone):
    model = pair_model(backbone, "PROMPT_TUNING_LORA")
    with pytest.raises(ValueError, match=r"pixel_values must be \(batch, images, 3, 64, 64\)"):
        model.visual_inputs(torch.zeros(2, 1, 3, 32, 32))


def test_image_size_rebuilds_the_vit_its_preprocessing_and_the_rows_of_a(backbone, tmp_path):
    output_dir = tmp_path / "run"
    main(backbone.argv("vqa", output_dir, "--image_size", "32", "--max_steps", "1", "--do_eval", "false",
                       "--do_predict", "false", "--eval_strategy", "no", "--save_strategy", "no",
                       "--load_best_model_at_end", "false"))
    assert read_json(output_dir / "training_task.json")["vision_backbone"]["image_size"] == [32, 32]
    vision = load_file(output_dir / VISION_ADAPTER_DIR / "adapter_model.safetensors")
    assert vision["lora_embedding_A"].shape == (4, 2)  # 32 / 16 = a 2 x 2 patch grid
