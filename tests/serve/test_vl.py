"""A VL-T5 base serves VQA and caption adapters from an uploaded image or a feature id, as offline generate."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dept import DePTModel
from dept_serve import ServingEngine
from dept_serve.errors import InvalidInputError
from dept_vl.data import open_feature_files, visual_inputs
from dept_vl.features import extract_to_h5
from dept_vl.images import load_image
from dept_vl.model import VLT5Config, VLT5ForConditionalGeneration
from dept_vl.modeling import load_vl_base_model
from tests.conftest import build_word_tokenizer, tiny_t5_config
from tests.serve.conftest import WORDS, served
from tests.vl.conftest import save_trained_vl_adapter

FEAT_DIM = 512  # resnet18's
IMAGE_FEATURES = {"backbone": "resnet18", "pretrained": False, "image_size": 64}  # a 2 x 2 grid
NEW_TOKENS = 5
QUESTIONS = ["vqa: what color is the circle?", "vqa: what shape is on the left?", "caption:"]


def _save_vl_adapter(base_dir, tokenizer, directory, task, seed, **sizes):
    base = load_vl_base_model(str(base_dir), FEAT_DIM)
    save_trained_vl_adapter(base, tokenizer, directory, seed, visual_scale=0.5, **sizes)
    record = {"task_names": [task], "modality": "vl", "feat_dim": FEAT_DIM, "image_features": IMAGE_FEATURES}
    (directory / "training_task.json").write_text(json.dumps(record))
    return directory


def test_vl_adapters_answer_from_uploaded_images_and_feature_ids_as_offline(tmp_path):
    tokenizer = build_word_tokenizer(WORDS, tmp_path / "base")
    torch.manual_seed(0)
    config = VLT5Config.from_t5_config(tiny_t5_config(len(tokenizer)), feat_dim=FEAT_DIM, n_images=2)
    vl_t5 = VLT5ForConditionalGeneration(config)
    with torch.no_grad():
        vl_t5.lm_head.weight[0] = 0  # random tiny weights favour the pad token: make the outputs tell more apart
    vl_t5.save_pretrained(tmp_path / "base")
    adapters = {"vqa": _save_vl_adapter(tmp_path / "base", tokenizer, tmp_path / "vqa", "vqa", 1,
                                        num_virtual_tokens=4, r=2, max_length=24),
                "caption": _save_vl_adapter(tmp_path / "base", tokenizer, tmp_path / "caption", "caption", 2,
                                            num_virtual_tokens=2, r=3, max_length=16)}
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (48 + 8 * i, 64, 3), dtype=np.uint8)).save(images / f"img{i}.png")

    engine = ServingEngine.load(str(tmp_path / "base"), adapters, device="cpu")
    extractor = engine.extractor_for(engine.adapters["vqa"])  # the backbone the adapters record
    assert (extractor.backbone, extractor.grid_size) == ("resnet18", (2, 2))
    extract_to_h5(images, tmp_path / "features.h5", extractor, progress=False)
    engine.feature_store = open_feature_files(str(tmp_path / "features.h5"))

    uploads = [base64.b64encode((images / f"img{i}.png").read_bytes()).decode() for i in range(3)]
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    corrupt = base64.b64encode(buffer.getvalue()[:40]).decode()  # a truncated PNG

    async def main():
        async with served(engine, max_wait_ms=100) as (_, client):
            good = await asyncio.gather(
                client.post("/v1/generate", json={"adapter": "vqa", "inputs": QUESTIONS[:2], "images": uploads[:2],
                                                  "max_new_tokens": NEW_TOKENS}),
                client.post("/v1/generate", json={"adapter": "caption", "inputs": QUESTIONS[2:] * 3,
                                                  "feature_ids": ["img0", "img1", "img2"],
                                                  "max_new_tokens": NEW_TOKENS}),
                client.post("/v1/generate", json={"adapter": "caption", "inputs": QUESTIONS[2:], "images": uploads[2:],
                                                  "max_new_tokens": NEW_TOKENS}))
            bad = [await client.post("/v1/generate", json={"adapter": "vqa", "inputs": QUESTIONS[:1], **extra})
                   for extra in ({"images": [corrupt]}, {"feature_ids": ["img9"]}, {"images": uploads[:2]}, {})]
            return good, bad

    good, bad = asyncio.run(main())
    requests = [("vqa", QUESTIONS[:2], [0, 1]), ("caption", QUESTIONS[2:] * 3, [0, 1, 2]), ("caption", QUESTIONS[2:], [2])]
    offline = {}
    for name, path in adapters.items():
        offline[name] = DePTModel.from_pretrained(load_vl_base_model(str(tmp_path / "base"), FEAT_DIM), path)
    tokens = []
    for (name, texts, image_ids), response in zip(requests, good):
        assert response.status_code == 200, response.text
        for text, i, output in zip(texts, image_ids, response.json()["outputs"]):
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            visual = visual_inputs([extractor([load_image(images / f"img{i}.png")])])
            with torch.no_grad():
                expected = offline[name].generate(input_ids=ids, attention_mask=torch.ones_like(ids), **visual,
                                                  max_new_tokens=NEW_TOKENS, do_sample=False,
                                                  pad_token_id=tokenizer.pad_token_id)[0].tolist()[1:]
            expected = expected[: expected.index(1) + 1] if 1 in expected else expected
            assert output["token_ids"] == expected, (name, text, i)
            tokens.append(tuple(expected))
    assert len(set(tokens)) > 1

    assert [response.status_code for response in bad] == [422] * 4
    errors = [response.json()["error"] for response in bad]
    assert "cannot load image images[0]" in errors[0]
    assert "'img9'" in errors[1]
    assert "1 inputs but 2 images" in errors[2]
    assert "send either images" in errors[3]


def test_a_pair_with_a_vision_adapter_is_refused_before_anything_loads(tmp_path):
    tokenizer = build_word_tokenizer(WORDS, tmp_path / "base")
    torch.manual_seed(0)
    config = VLT5Config.from_t5_config(tiny_t5_config(len(tokenizer)), feat_dim=FEAT_DIM, n_images=2)
    VLT5ForConditionalGeneration(config).save_pretrained(tmp_path / "base")
    frozen = _save_vl_adapter(tmp_path / "base", tokenizer, tmp_path / "frozen", "vqa", 1, num_virtual_tokens=2, r=2,
                              max_length=16)
    pair = _save_vl_adapter(tmp_path / "base", tokenizer, tmp_path / "pair", "vqa", 2, num_virtual_tokens=2, r=2,
                            max_length=16)
    record = json.loads((pair / "training_task.json").read_text())
    record["vision_backbone"] = {"backbone": "vit_tiny_patch16_224", "image_size": 64}
    (pair / "training_task.json").write_text(json.dumps(record))
    engine = ServingEngine.load(str(tmp_path / "base"), {"frozen": frozen}, device="cpu")
    with pytest.raises(InvalidInputError, match=r"is a pair: .*vit_tiny_patch16_224.*dept-train-vl --peft_model_id"):
        engine.add_adapter("pair", pair)
    assert sorted(engine.adapters) == ["frozen"] and engine.multi.list_adapters() == ["frozen"]
