"""No code runs from a download unless the user asks: a scan of every shipped source file, plus image-path escapes.

The scan reads the syntax tree (not the text), so a call split over several lines is still seen, and a comment or
docstring that merely mentions `torch.load` is not a finding.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from dept_vl.images import ImagePathError, resolve_image_path
from tests.conftest import REPO_ROOT

SHIPPED_SOURCES = ("dept", "dept_nlp", "dept_vl", "dept_serve", "dept_tune", "scripts")


def _python_files() -> list[Path]:
    files = [path for folder in SHIPPED_SOURCES for path in sorted((REPO_ROOT / folder).rglob("*.py"))]
    assert len(files) > 20, "the scan found almost no source: did the layout change?"
    return files


def _dotted_name(node: ast.AST) -> str:
    """`torch.load` for the call target `torch.load`; `<expr>.eval` for `model.train().eval`."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        prefix = _dotted_name(node.value)
        return f"{prefix}.{node.attr}" if prefix else f"<expr>.{node.attr}"
    return "<expr>"


def _keyword_is_true(call: ast.Call, name: str) -> bool:
    return any(kw.arg == name and isinstance(kw.value, ast.Constant) and kw.value.value is True for kw in call.keywords)


def _unsafe_calls(source: str, filename: str) -> list[str]:
    """Every call in `source` that could run code from a file or a download, as "file:line: what"."""
    findings = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted_name(node.func)
        where = f"{filename}:{node.lineno}"
        if _keyword_is_true(node, "trust_remote_code"):
            findings.append(f"{where}: trust_remote_code=True written in the code, not taken from a user flag")
        if name == "torch.load" and not _keyword_is_true(node, "weights_only"):
            findings.append(f"{where}: torch.load without weights_only=True")
        if name.split(".")[-1] in ("load", "loads") and name.split(".")[0] in ("pickle", "cPickle", "dill", "joblib"):
            findings.append(f"{where}: {name} unpickles arbitrary objects")
        if name in ("np.load", "numpy.load") and _keyword_is_true(node, "allow_pickle"):
            findings.append(f"{where}: {name}(allow_pickle=True)")
        if name == "yaml.load" or name == "yaml.unsafe_load":
            findings.append(f"{where}: {name} can build arbitrary objects; use yaml.safe_load")
        if name in ("eval", "exec"):
            findings.append(f"{where}: {name} of a string")
    return findings


def test_shipped_code_never_unpickles_trusts_remote_code_or_evals():
    findings = []
    for path in _python_files():
        findings += _unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(REPO_ROOT)))
    assert findings == []


@pytest.mark.parametrize(
    "snippet",
    [
        "AutoModel.from_pretrained(name, trust_remote_code=True)",
        "datasets.load_dataset(path,\n    trust_remote_code=True)",
        "torch.load(path)",
        "torch.load(path, weights_only=False)",
        "torch.load(\n    path,\n    map_location='cpu',\n)",
        "pickle.load(handle)",
        "pickle.loads(data)",
        "joblib.load(path)",
        "np.load(path, allow_pickle=True)",
        "numpy.load(path, mmap_mode='r', allow_pickle=True)",
        "yaml.load(text)",
        "eval(text)",
    ],
)
def test_the_scan_catches_each_unsafe_call(snippet):
    assert len(_unsafe_calls(snippet, "snippet.py")) == 1


@pytest.mark.parametrize(
    "snippet",
    [
        "AutoModel.from_pretrained(name, trust_remote_code=args.trust_remote_code)",
        "AutoTokenizer.from_pretrained(name)",
        "torch.load(path, map_location='cpu', weights_only=True)",
        "np.load(path, allow_pickle=False)",
        "yaml.safe_load(text)",
        "# torch.load(path) in a comment\nx = 'pickle.load(f) in a string'",
        "model.eval()",
    ],
)
def test_the_scan_passes_safe_calls(snippet):
    assert _unsafe_calls(snippet, "snippet.py") == []


def test_every_model_and_tokenizer_loader_takes_trust_remote_code_from_the_user():
    """Each `from_pretrained` of a Hugging Face Auto class passes `trust_remote_code` through from a parameter or
    flag that defaults to False, or does not pass it at all (then transformers refuses remote code)."""
    passed_through = []
    for path in _python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _dotted_name(node.func).endswith("from_pretrained"):
                for keyword in node.keywords:
                    if keyword.arg == "trust_remote_code":
                        assert not isinstance(keyword.value, ast.Constant), f"{path}:{node.lineno}"
                        passed_through.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.FunctionDef):  # a parameter named trust_remote_code defaults to False
                arguments = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults
                defaults += node.args.kw_defaults
                for argument, default in zip(arguments, defaults):
                    if argument.arg == "trust_remote_code":
                        assert isinstance(default, ast.Constant) and default.value is False, f"{path}:{node.lineno}"
    assert passed_through, "no loader passes trust_remote_code: did the model loading move?"


def test_the_trust_remote_code_flag_defaults_to_off():
    from dept_nlp.arguments import ModelArguments

    assert ModelArguments(model_name_or_path="t5-base").trust_remote_code is False


# ---------------------------------------------------------------------------------------------------------------
# Image paths from annotation files stay under the image root. The plain `../` and absolute cases are in
# tests/vl/test_images.py; these are the ones a string-prefix check would get wrong.


def test_a_sibling_folder_that_shares_the_roots_prefix_is_outside_the_root(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (tmp_path / "images_private").mkdir()
    with pytest.raises(ImagePathError, match="outside the image root"):
        resolve_image_path(root, "../images_private/secret.jpg")
    with pytest.raises(ImagePathError, match="outside the image root"):
        resolve_image_path(root, str(tmp_path / "images_private" / "secret.jpg"))


@pytest.mark.parametrize("relative", ["a/b/../../../secret.jpg", "./../secret.jpg", "..", "a/./../../x.jpg"])
def test_escapes_hidden_behind_inner_folders_are_refused(tmp_path, relative):
    with pytest.raises(ImagePathError):
        resolve_image_path(tmp_path / "root", relative)


def test_a_symlink_the_user_placed_inside_the_root_still_works(tmp_path):
    data = tmp_path / "data" / "coco"
    data.mkdir(parents=True)
    (data / "a.jpg").write_bytes(b"")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(data, root / "train2014")
    resolved = resolve_image_path(root, "train2014/a.jpg")
    assert resolved == root / "train2014" / "a.jpg" and resolved.exists()
