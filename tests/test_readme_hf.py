"""The README's section "transformers' Trainer, TRL and the Hub", run as written.

Each Python block of that section is read from README.md and executed, with only what this machine cannot do
replaced (each replacement must match, so a README edit that would bypass it fails here): the Hub's models and
GLUE become a tiny saved model and SST-2 rows in the hub schema, 30000 steps become a few, output directories go
under tmp_path, TRL's bf16 default gets `use_cpu=True` (no GPU here), and the Hub is the `HfApi` recorder of
`tests/dept/test_hub.py` whose commits land in a huggingface_hub cache that the load reads offline.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, RepoUrl, constants

from dept import DePTModel
from dept_nlp.tasks import get_task
from tests.conftest import hub_row, put_in_hub_cache, save_tiny_model, write_task_fixture

pytestmark = pytest.mark.xdist_group("readme_hf")  # shares module-scoped runs: one worker (--dist loadgroup)

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## transformers' Trainer, TRL and the Hub"
WEIGHT_FILES = {"model.safetensors", "pytorch_model.bin", "adapter_model.bin", "adapter_model.safetensors"}


def section_blocks() -> list[str]:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def run_block(code: str, replacements: dict[str, str], namespace: dict | None = None) -> dict:
    for old, new in replacements.items():
        assert old in code, f"the README example no longer contains {old!r}"
        code = code.replace(old, new)
    namespace = {} if namespace is None else namespace
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    return namespace


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme_hf")
    files = write_task_fixture("sst2", root / "data", n_train=16, n_val=4, n_test=4)
    texts = [get_task("sst2").format_example(hub_row("sst2", i))[0] + " Label :" for i in range(40)]
    return {"train": str(files["train_file"]), "t5": str(save_tiny_model("seq2seq", root / "t5", texts)),
            "llama": str(save_tiny_model("causal", root / "llama", texts))}


def test_the_section_has_the_trainer_trl_and_hub_examples():
    blocks = section_blocks()
    assert len(blocks) == 3
    assert "DePTSeq2SeqTrainer" in blocks[0] and "DePTSFTTrainer" in blocks[1] and "push_to_hub" in blocks[2]


def glue(data) -> dict[str, str]:
    return {'load_dataset("glue", "sst2", split="train")': f'load_dataset("json", data_files={data["train"]!r}, '
                                                           'split="train")'}


def test_the_trainer_example_trains_and_saves_the_adapter_only(data, tmp_path):
    out = tmp_path / "sst2-trainer"
    ns = run_block(section_blocks()[0], {'"t5-base"': repr(data["t5"]), "max_steps=30000": "max_steps=12",
                                         '"outputs/sst2-trainer"': repr(str(out)), **glue(data)})
    names = {path.name for path in out.iterdir()}
    assert names & WEIGHT_FILES == {"adapter_model.safetensors"} and {"adapter_config.json", "README.md"} <= names
    trained, reloaded = ns["trainer"].model, ns["reloaded"]
    batch = ns["tokenizer"](["sentence: a gorgeous, witty film"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.generate(**batch, max_new_tokens=3),
                                   trained.eval().generate(**batch, max_new_tokens=3), rtol=0, atol=0)
    rates = {group["name"]: group["initial_lr"] for group in ns["trainer"].optimizer.param_groups}
    assert rates == {"prompt": 3e-1, "lora_embedding": 5e-3}


def test_the_trl_example_trains_and_saves_the_adapter_only(data, tmp_path):
    pytest.importorskip("trl")  # the peers extra
    out = tmp_path / "sst2-sft"
    ns = run_block(section_blocks()[1], {'"meta-llama/Llama-3.2-1B"': repr(data["llama"]),
                                         "max_steps=30000": "max_steps=6, use_cpu=True",
                                         '"outputs/sst2-sft"': repr(str(out)), **glue(data)})
    names = {path.name for path in out.iterdir()}
    assert names & WEIGHT_FILES == {"adapter_model.safetensors"} and "adapter_config.json" in names
    assert ModelCard.load(out / "README.md").data.library_name == "dept"
    assert ns["trainer"].state.global_step == 6
    fresh = DePTModel.from_pretrained(type(ns["model"].base_model).from_pretrained(data["llama"]), out)
    batch = ns["tokenizer"](["sentence: a gorgeous, witty film Label :"], return_tensors="pt")
    assert torch.equal(fresh.generate(**batch, max_new_tokens=2),
                       ns["model"].eval().generate(**batch, max_new_tokens=2))


def test_the_hub_example_pushes_and_loads_back_by_id(data, tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    pushed = SimpleNamespace(files=None)

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):  # the push, then what a download would cache
        pushed.files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        put_in_hub_cache(cache, repo_id, pushed.files, "0" * 40)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    trained = run_block(section_blocks()[0], {'"t5-base"': repr(data["t5"]), "max_steps=30000": "max_steps=2",
                                              '"outputs/sst2-trainer"': repr(str(tmp_path / "run")), **glue(data)})
    ns = run_block(section_blocks()[2], {'"t5-base"': repr(data["t5"]), '"outputs/sst2"': repr(str(tmp_path / "run"))},
                   namespace={**trained, "model": trained["trainer"].model})
    assert set(pushed.files) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    batch = trained["tokenizer"](["sentence: a dull film"], return_tensors="pt")
    torch.testing.assert_close(ns["model"].generate(**batch, max_new_tokens=3),
                               trained["trainer"].model.eval().generate(**batch, max_new_tokens=3), rtol=0, atol=0)
