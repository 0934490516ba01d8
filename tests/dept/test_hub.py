"""DePT adapters on the Hub (`dept.hub`), with no Hub to reach: loading by repository id goes through
huggingface_hub's real cache layout offline (HF_HUB_OFFLINE=1), and pushing is checked at the `HfApi` boundary,
whose methods are replaced by recorders. The model card is read back with `huggingface_hub.ModelCard`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, RepoUrl, constants
from safetensors.torch import load

from dept import DePTConfig, DePTModel, get_dept_model
from dept.config import read_training_task
from dept.hub import AdapterNotFoundError, resolve_adapter_dir
from tests.conftest import TASK_TYPES, dept_forward, put_in_hub_cache

ADAPTER_UPLOAD = {"adapter_config.json", "adapter_model.safetensors", "README.md"}
RUN_RECORD = "training_task.json"  # uploaded beside the adapter when the run wrote one
PIPELINE_TAGS = {"seq2seq": "text2text-generation", "causal": "text-generation", "cls": "text-classification"}


def test_the_tests_run_offline():
    assert constants.HF_HUB_OFFLINE  # set by tests/conftest.py before huggingface_hub is imported


def adapter(kind: str, model, tokenizer, seed: int = 0, base_name: str | None = "org/tiny-base") -> DePTModel:
    """A DePT model whose P, A and B are drawn from `seed` (B non-zero), recorded as trained on `base_name`."""
    config = DePTConfig(num_virtual_tokens=3, r=2, max_length=16, prompt_init="vocab", task_type=TASK_TYPES[kind],
                        base_model_name_or_path=base_name)
    dept_model = get_dept_model(model, config, tokenizer=tokenizer)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in dept_model.prompt_encoder.adapter_tensors().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return dept_model.eval()


def saved_files(dept_model: DePTModel, directory: Path) -> dict[str, bytes]:
    dept_model.save_pretrained(directory)
    return {path.name: path.read_bytes() for path in directory.iterdir()}


def batch_for(tokenizer):
    return dict(tokenizer(["the movie was great", "a dull film with terrible acting"], padding=True,
                          return_tensors="pt"))


@torch.no_grad()
def answers(kind, dept_model, tokenizer):
    return dept_forward(kind, dept_model, batch_for(tokenizer))


def test_a_hub_id_loads_offline_from_the_cache_by_id_and_by_revision(any_model, tokenizer, tmp_path):
    kind, model = any_model
    main = adapter(kind, model, tokenizer, seed=1)
    main_files = saved_files(main, tmp_path / "main")
    main_answers = answers(kind, main, tokenizer)
    tagged = adapter(kind, main.base_model, tokenizer, seed=2)
    tagged_files = saved_files(tagged, tmp_path / "tagged")
    tagged_answers = answers(kind, tagged, tokenizer)
    assert not torch.allclose(main_answers, tagged_answers)
    cache = tmp_path / "hub-cache"
    first, second = "a" * 40, "b" * 40
    put_in_hub_cache(cache, "user/dept-adapter", main_files, first, refs=("main",))
    put_in_hub_cache(cache, "user/dept-adapter", tagged_files, second, refs=("v1",))

    for revision, expected in ((None, main_answers), ("v1", tagged_answers), (first, main_answers),
                               (second, tagged_answers)):
        loaded = DePTModel.from_pretrained(main.base_model, "user/dept-adapter", revision=revision, cache_dir=cache,
                                           token="hf_unused")
        torch.testing.assert_close(answers(kind, loaded, tokenizer), expected, rtol=0, atol=0)
    assert resolve_adapter_dir("user/dept-adapter", cache_dir=cache) == (
        cache / "models--user--dept-adapter" / "snapshots" / first)


def test_the_default_cache_is_huggingface_hubs(t5_model, tokenizer, tmp_path, monkeypatch):
    files = saved_files(adapter("t5", t5_model, tokenizer), tmp_path / "saved")
    put_in_hub_cache(tmp_path / "hub", "user/dept-adapter", files, "c" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # what HF_HUB_CACHE sets at import
    assert resolve_adapter_dir("user/dept-adapter") == tmp_path / "hub" / "models--user--dept-adapter" / "snapshots" / (
        "c" * 40)


def test_neither_a_directory_nor_a_cached_repository_is_named_clearly(t5_model, tokenizer, tmp_path):
    with pytest.raises(AdapterNotFoundError, match="does not exist"):
        DePTModel.from_pretrained(t5_model, tmp_path / "nowhere")
    with pytest.raises(AdapterNotFoundError, match=r"user/missing is not a local directory.*not in the cache.*"
                                                   r"HF_HUB_OFFLINE"):
        DePTModel.from_pretrained(t5_model, "user/missing", cache_dir=tmp_path)
    put_in_hub_cache(tmp_path, "user/there", saved_files(adapter("t5", t5_model, tokenizer), tmp_path / "s"), "d" * 40)
    with pytest.raises(AdapterNotFoundError, match="at revision 'v9' is not in the cache"):
        DePTModel.from_pretrained(t5_model, "user/there", revision="v9", cache_dir=tmp_path)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(AdapterNotFoundError, match="is a file"):
        resolve_adapter_dir(tmp_path / "a_file")
    assert issubclass(AdapterNotFoundError, FileNotFoundError)  # caught as before by every CLI


# ---------------------------------------------------------------------------------------------------- model card


def write_run_files(directory: Path, task: str = "sst2") -> None:
    """What dept-train writes beside the adapter: the task record and every split's metrics."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "training_task.json").write_text(json.dumps({"task_names": [task], "modality": "text"}))
    (directory / "all_results.json").write_text(json.dumps({
        "eval_accuracy": 91.5, "eval_loss": 0.3, "eval_runtime": 1.2, "eval_samples_per_second": 40.0,
        "test_accuracy": 90.25, "test_f1": 88.0, "train_loss": 0.4, "epoch": 3.0}))


def test_the_model_card_names_the_base_the_library_and_the_task_type(any_model, tokenizer, tmp_path):
    kind, model = any_model
    adapter(kind, model, tokenizer).save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    task_type = TASK_TYPES[kind]
    assert card.data.base_model == "org/tiny-base"
    assert card.data.library_name == "dept"
    assert card.data.tags == ["dept", "prompt-tuning", task_type]
    assert card.data.pipeline_tag == PIPELINE_TAGS[task_type]
    assert card.data.eval_results is None  # nothing known about a run here
    assert "DePTModel.from_pretrained(base" in card.text and "| 3 | 2 | 16 | 8 |" in card.text


def test_a_local_base_model_is_not_named_as_a_hub_base(t5_model, tokenizer, tmp_path):
    adapter("t5", t5_model, tokenizer, base_name=str(tmp_path)).save_pretrained(tmp_path / "out")
    assert ModelCard.load(tmp_path / "out" / "README.md").data.base_model is None


def test_the_model_card_takes_the_runs_task_and_metrics(t5_model, tokenizer, tmp_path):
    write_run_files(tmp_path)
    adapter("t5", t5_model, tokenizer).save_pretrained(tmp_path, model_card_data={"license": "mit",
                                                                                    "tags": ["glue"]})
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.tags == ["dept", "prompt-tuning", "seq2seq", "sst2", "glue"]
    assert card.data.license == "mit"
    results = {(r.dataset_name, r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {("sst2", "validation", "accuracy"): 91.5, ("sst2", "test", "accuracy"): 90.25,
                       ("sst2", "test", "f1"): 88.0}  # losses, runtimes and training figures are no task metric
    assert "| test | accuracy | 90.25 |" in card.text


def test_a_readme_dept_did_not_write_is_kept_and_ours_is_renewed(t5_model, tokenizer, tmp_path, caplog):
    users = "# My adapter\n\nNotes I wrote myself.\n"
    (tmp_path / "users").mkdir()
    (tmp_path / "users" / "README.md").write_text(users)
    dept_model = adapter("t5", t5_model, tokenizer)
    with caplog.at_level(logging.WARNING, logger="dept.hub"):
        dept_model.save_pretrained(tmp_path / "users")
    assert (tmp_path / "users" / "README.md").read_text() == users
    assert "not written by dept" in caplog.text
    dept_model.save_pretrained(tmp_path / "ours")
    assert ModelCard.load(tmp_path / "ours" / "README.md").data.eval_results is None
    write_run_files(tmp_path / "ours")  # the run's results arrive after the first save
    dept_model.save_pretrained(tmp_path / "ours")
    assert ModelCard.load(tmp_path / "ours" / "README.md").data.eval_results


# ---------------------------------------------------------------------------------------------------- upload


@pytest.fixture
def hub(monkeypatch):
    """HfApi's repository and commit methods replaced by recorders: what would reach the Hub, byte for byte."""
    record = SimpleNamespace(repos=[], branches=[], commits=[])

    def create_repo(self, repo_id, *, private=None, exist_ok=False, repo_type=None, **kwargs):
        record.repos.append({"repo_id": repo_id, "private": private, "exist_ok": exist_ok, "repo_type": repo_type,
                             "token": self.token})
        full_id = repo_id if "/" in repo_id else f"user/{repo_id}"  # the Hub puts a bare name under the token's user
        return RepoUrl(f"https://huggingface.co/{full_id}")

    def create_branch(self, repo_id, *, branch, exist_ok=False, **kwargs):
        record.branches.append({"repo_id": repo_id, "branch": branch, "exist_ok": exist_ok})

    def create_commit(self, repo_id, operations, *, commit_message, revision=None, create_pr=False, **kwargs):
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        record.commits.append({"repo_id": repo_id, "files": files, "revision": revision, "create_pr": create_pr,
                               "message": commit_message, "token": self.token})
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{'e' * 40}")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return record


def test_push_to_hub_uploads_the_adapter_files_and_the_card_only(any_model, tokenizer, tmp_path, hub):
    kind, model = any_model
    dept_model = adapter(kind, model, tokenizer)
    write_run_files(tmp_path / "run")
    dept_model.push_to_hub("me/dept-sst2", run_dir=tmp_path / "run", token="hf_token", private=True)
    assert hub.repos == [{"repo_id": "me/dept-sst2", "private": True, "exist_ok": True, "repo_type": "model",
                          "token": "hf_token"}]
    assert hub.branches == []
    (commit,) = hub.commits
    assert set(commit["files"]) == ADAPTER_UPLOAD | {RUN_RECORD} and commit["revision"] is None
    assert commit["token"] == "hf_token"
    assert commit["files"][RUN_RECORD] == (tmp_path / "run" / RUN_RECORD).read_bytes()
    uploaded = load(commit["files"]["adapter_model.safetensors"])
    for key, value in dept_model.adapter_state_dict().items():
        assert torch.equal(uploaded[key], value), key
    assert json.loads(commit["files"]["adapter_config.json"]) == dept_model.config.to_dict()
    card = ModelCard(commit["files"]["README.md"].decode())
    assert card.data.model_name == "me/dept-sst2" and "DePTModel.from_pretrained(base, 'me/dept-sst2')" in card.text
    assert {r.metric_type for r in card.data.eval_results} == {"accuracy", "f1"}


def test_the_pushed_adapter_loads_back_by_id_through_the_cache(any_model, tokenizer, tmp_path, hub):
    kind, model = any_model
    dept_model = adapter(kind, model, tokenizer, seed=3)
    write_run_files(tmp_path / "run")
    dept_model.push_to_hub("me/round-trip", run_dir=tmp_path / "run")
    put_in_hub_cache(tmp_path / "cache", "me/round-trip", hub.commits[0]["files"], "f" * 40)
    loaded = DePTModel.from_pretrained(dept_model.base_model, "me/round-trip", cache_dir=tmp_path / "cache")
    torch.testing.assert_close(answers(kind, loaded, tokenizer), answers(kind, dept_model, tokenizer), rtol=0, atol=0)
    resolved = resolve_adapter_dir("me/round-trip", cache_dir=tmp_path / "cache")  # the run's record came along
    assert read_training_task(resolved) == read_training_task(tmp_path / "run")


def test_a_push_without_a_run_uploads_no_record(t5_model, tokenizer, hub):
    adapter("t5", t5_model, tokenizer).push_to_hub("me/bare")
    assert set(hub.commits[0]["files"]) == ADAPTER_UPLOAD


def test_save_pretrained_with_push_to_hub_leaves_the_rest_of_the_directory_home(t5_model, tokenizer, tmp_path, hub):
    run = tmp_path / "sst2"
    write_run_files(run)
    (run / "checkpoint-10").mkdir()
    (run / "checkpoint-10" / "adapter_model.safetensors").write_bytes(b"old")
    (run / "training_args.bin").write_bytes(b"args")
    (run / "predictions_test.jsonl").write_text("{}\n")
    dept_model = adapter("t5", t5_model, tokenizer)
    dept_model.save_pretrained(run, push_to_hub=True, revision="v2", commit_message="sst2 run", create_pr=True,
                               model_card_data=ModelCardData(language="en"))
    assert hub.repos[0]["repo_id"] == "sst2"  # the directory's name, as transformers' default
    assert hub.branches == [{"repo_id": "user/sst2", "branch": "v2", "exist_ok": True}]
    (commit,) = hub.commits
    assert commit["repo_id"] == "user/sst2"
    assert set(commit["files"]) == ADAPTER_UPLOAD | {RUN_RECORD}  # not the checkpoints, args or predictions
    assert (commit["revision"], commit["create_pr"], commit["message"]) == ("v2", True, "sst2 run")
    card = ModelCard(commit["files"]["README.md"].decode())
    assert card.data.language == "en" and card.data.eval_results  # the run's results, from the directory
    assert commit["files"]["README.md"] == (run / "README.md").read_bytes()


def test_hub_options_without_push_to_hub_are_refused(t5_model, tokenizer, tmp_path, hub):
    with pytest.raises(TypeError, match="without push_to_hub=True"):
        adapter("t5", t5_model, tokenizer).save_pretrained(tmp_path, private=True)
    assert hub.commits == []
