"""A DePT VL-T5 model names the visual inputs and T5's decoder inputs, so transformers' Trainer keeps them."""

import datasets
from transformers import Trainer, TrainingArguments

from dept import DePTConfig
from dept_vl.model import get_dept_vl_model


def test_trainer_keeps_the_visual_and_decoder_columns_of_a_vl_t5_dept_model(vl_model, tokenizer, tmp_path):
    model = get_dept_vl_model(vl_model, DePTConfig(num_virtual_tokens=2, r=2, max_length=16), tokenizer)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], save_strategy="no")
    trainer = Trainer(model=model, args=args)
    needed = ["input_ids", "attention_mask", "vis_feats", "vis_boxes", "vis_attention_mask", "labels",
              "decoder_input_ids", "decoder_attention_mask"]
    dataset = datasets.Dataset.from_dict({name: [[1]] for name in [*needed, "question_text"]})
    assert sorted(trainer._remove_unused_columns(dataset).column_names) == sorted(needed)
