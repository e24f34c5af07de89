"""The patchkit command: plugins, plan from a config on the meta device, never running checkpoint code."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from patchkit.cli import build_meta_model, main

CONFIG_70B = Path(__file__).parent / "data" / "llama-2-70b"


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "patchkit.cli", *args], capture_output=True, text=True, env=env)


def test_plugins_lists_first_party_plugins(capsys):
    assert main(["plugins", "--json"]) == 0
    infos = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert {"flash2", "sdpa", "bnb"} <= set(infos)
    assert all(info["status"] == "loaded" for name, info in infos.items() if name in ("flash2", "sdpa", "bnb"))


def test_plugins_strict_exits_nonzero_with_a_broken_plugin(broken_plugins_site):
    import os

    env = {**os.environ, "PYTHONPATH": str(broken_plugins_site), "PATCHKIT_STRICT_PLUGINS": "1"}
    result = run_cli("plugins", env=env)
    assert result.returncode != 0 and "PluginError" in result.stderr
    env.pop("PATCHKIT_STRICT_PLUGINS")
    result = run_cli("plugins", env=env)
    assert result.returncode == 1 and "failed" in result.stdout and "sdpa" in result.stdout


def test_plan_70b_from_config_on_meta_is_fast():
    pytest.importorskip("transformers")
    import patchkit

    model = build_meta_model(CONFIG_70B)
    assert next(model.parameters()).device.type == "meta"
    start = time.perf_counter()
    plan = patchkit.plan(model, quantize="int8")
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, elapsed
    # 80 layers x 7 linears quantized; lm_head left alone by default
    assert len(plan.patches) == 560
    assert any(s.path == "lm_head" for s in plan.skipped)


def test_plan_command_prints_the_table(capsys):
    pytest.importorskip("transformers")
    assert main(["plan", str(CONFIG_70B / "config.json"), "--quantize", "nf4", "--skip", "model.layers.0"]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "model.layers.1.mlp.down_proj" in out and "skip pattern" in out


def test_plan_never_runs_checkpoint_code_or_unpickles(tmp_path):
    pytest.importorskip("transformers")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    config = json.loads((CONFIG_70B / "config.json").read_text())
    config.update(num_hidden_layers=2)
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    (ckpt / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    assert main(["plan", str(ckpt), "--quantize", "int8"]) == 0
    assert not marker.exists()
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (ckpt / "config.json").write_text(json.dumps(config))
    assert main(["plan", str(ckpt)]) == 2
    assert not marker.exists()
