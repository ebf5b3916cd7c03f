"""`python -m treespec.bench.tree_tools` reads the files docs/configs.md says it reads: a preset
file (YAML or JSON, its `profile`) or a profile file (`probs`)."""

from __future__ import annotations

import json

from treespec.bench.tree_tools import load_profile, main
from treespec.tree.presets import load_preset

PRESET = "treespec/configs/presets/optimized_code.yaml"


def test_a_shipped_preset_yaml_is_a_profile(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    out = tmp_path / "sub" / "code-8.yaml"
    assert main(["--profile", PRESET, "--budget", "8", "--max-depth", "4", "--out", str(out)]) == 0
    assert "expected tau" in capsys.readouterr().out
    assert load_preset(out).num_nodes == 9  # 8 drafts and the root
    yaml_profile = load_profile(PRESET)
    as_json = tmp_path / "profile.json"
    as_json.write_text(json.dumps({"probs": [list(row) for row in yaml_profile.probs]}))
    assert main(["--profile", str(as_json), "--budget", "8", "--max-depth", "4"]) == 0


def test_a_file_without_a_profile_is_refused_with_a_message(tmp_path, capsys):
    bad = tmp_path / "x.yaml"
    bad.write_text("name: nothing here\n")
    assert main(["--profile", str(bad), "--budget", "8", "--max-depth", "4"]) == 2
    assert "has no 'profile' (a preset file) or 'probs' (a profile file) entry" in capsys.readouterr().err
    bad.write_text("{ not yaml: [")
    assert main(["--profile", str(bad), "--budget", "8", "--max-depth", "4"]) == 2
    assert "neither YAML nor JSON" in capsys.readouterr().err
