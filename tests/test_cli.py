"""The patchkit command: plugins, plan from a config on the meta device, never running checkpoint code."""

from __future__ import annotations

import importlib.util
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
    # "is Mistral supported?": the answer is in the listing, in --json and in text
    llama = next(p for p in infos["flash2"]["patcher_details"] if p["qualname"] == "flash2:flash2-llama")
    assert "MistralAttention" in llama["covers"] and llama["family"] == "flash2"
    flash_attn = next(b for b in infos["flash2"]["backend_details"] if b["name"] == "flash_attn")
    has_flash_attn = importlib.util.find_spec("flash_attn") is not None
    assert (flash_attn["unavailable"] is None) == has_flash_attn
    assert main(["plugins"]) == 0
    text = capsys.readouterr().out
    assert "patcher  flash2:flash2-llama  attention=flash2  covers LlamaAttention, MistralAttention" in text
    assert "patcher  bnb:bnb-int8  quantize=int8  covers torch.nn.Linear and subclasses" in text
    if not has_flash_attn:
        assert "backend  flash_attn  unavailable: needs flash-attn>=2.5, which is not installed: pip install" in text


def test_plugins_marks_a_plugin_missing_a_dependency_unavailable_with_the_hint(broken_plugins_site):
    import os

    paths = [str(broken_plugins_site), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    env.pop("PATCHKIT_STRICT_PLUGINS", None)
    out = run_cli("plugins", env=env).stdout
    line = next(line for line in out.splitlines() if line.startswith("needs_missing"))
    assert "unavailable (needs patchkit-nonexistent-package>=1, which is not installed" in line
    assert "pip install 'patchkit-nonexistent-package>=1'" in line


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
    patchkit.plan(model, quantize="int8", only="model.layers.0")  # one-time costs: importing bitsandbytes
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


MINILM = {
    "architectures": ["BertModel"],
    "model_type": "bert",
    "hidden_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "vocab_size": 30522,
}


def write_config(tmp_path: Path, config: dict | str, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    return path


def test_plan_builds_the_configs_architecture_in_inference_mode(tmp_path, capsys):
    pytest.importorskip("transformers")
    model = build_meta_model(write_config(tmp_path, MINILM))
    assert type(model).__name__ == "BertModel" and not model.training  # not BertLMHeadModel, eval()
    assert build_meta_model(write_config(tmp_path, MINILM), train=True).training
    assert main(["plan", str(tmp_path / "config.json"), "--attention", "sdpa"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("BertModel (built on the meta device") and "inference mode (eval)" in out
    assert "\nencoder " in out and "bert.encoder" not in out
    # flash2 on a float32 model: inference needs no backward kernel; the reference backend plans
    llama = json.loads((CONFIG_70B / "config.json").read_text()) | {"num_hidden_layers": 2, "torch_dtype": "float32"}
    cfg = write_config(tmp_path, llama, "llama.json")
    assert main(["plan", str(cfg), "--attention", "flash2", "--backend", "reference"]) == 0
    assert "model.layers.1.self_attn" in capsys.readouterr().out
    assert main(["plan", str(cfg), "--attention", "flash2", "--backend", "torch"]) == 2
    err = capsys.readouterr().err
    assert "backward" not in err and len(err.strip().splitlines()) == 1


def test_plan_patch_kind_other_train_switch_and_options(
    tmp_path, capsys, example_plugin_site, monkeypatch, fresh_default_registry
):
    pytest.importorskip("transformers")
    monkeypatch.syspath_prepend(str(example_plugin_site))
    cfg = str(write_config(tmp_path, MINILM))
    assert main(["plan", cfg, "--patch", "nodropout"]) == 0  # the docs' example plugin, from the CLI
    out = capsys.readouterr().out
    assert "patch=nodropout:" in out and "embeddings.dropout" in out
    assert main(["plan", cfg, "--patch", "nodropout", "--train"]) == 2  # an inference-only patcher refuses
    err = capsys.readouterr().err
    assert "model.eval" in err and len(err.strip().splitlines()) == 1
    assert main(["plan", cfg, "--patch", "nodropout", "--train", "-o", "allow_training=true"]) == 0
    assert "training mode (--train)" in capsys.readouterr().out
    llama = json.loads((CONFIG_70B / "config.json").read_text()) | {"num_hidden_layers": 1}
    small = str(write_config(tmp_path, llama, "llama.json"))
    assert main(["plan", small, "--quantize", "int8", "-o", "skip_defaults=false"]) == 0
    out = capsys.readouterr().out
    assert "quantize=int8: 8 to patch, 0 left alone" in out and "\nlm_head " in out  # the option reached bnb
    assert main(["plan", small, "--quantize", "int8", "-o", "treshold=5"]) == 2
    err = capsys.readouterr().err
    assert "unknown option 'treshold'" in err and "Did you mean 'threshold'?" in err
    assert main(["plan", small, "--quantize", "int8", "-o", "novalue"]) == 2
    assert "expected key=value" in capsys.readouterr().err


@pytest.mark.parametrize(
    "config, expected",
    [
        ('{"model_type": "bert",', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"model_type": "lamma"}, "unknown model_type 'lamma'"),
        ({"hidden_size": 8}, "unknown model_type None"),
    ],
)
def test_plan_bad_input_is_one_line_and_exit_2(tmp_path, config, expected):
    pytest.importorskip("transformers")
    result = run_cli("plan", str(write_config(tmp_path, config)), "--attention", "sdpa")
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_plan_usage_errors_and_cli_words(tmp_path, capsys):
    pytest.importorskip("transformers")
    cfg = str(write_config(tmp_path, MINILM))
    assert main(["plan", cfg]) == 2  # nothing requested
    assert "nothing to plan: pass --attention, --quantize or --patch" in capsys.readouterr().err
    assert main(["plan", str(tmp_path / "missing.json"), "--attention", "sdpa"]) == 2
    assert main(["plan", cfg, "--attention", "flash2"]) == 2  # a BERT has nothing flash2 patches
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "Pass --lenient to accept a no-op" in err and "strict=False" not in err
    assert main(["plan", cfg, "--attention", "flash2", "--lenient"]) == 0
    assert "attention=flash2: 0 to patch" in capsys.readouterr().out


def test_report_fits_100_columns_and_names_the_kernel():
    pytest.importorskip("transformers")
    from exactness import tiny_llama

    model = tiny_llama().eval()
    report = patchkit_apply(model, attention="flash2", backend="reference")
    text = str(report)
    assert "kernel: reference" in text  # which backend was chosen
    assert max(len(line) for line in text.splitlines()) <= 100, text
    import patchkit

    patchkit.reverse(model)


def patchkit_apply(model, **kwargs):
    import patchkit

    return patchkit.apply(model, **kwargs)


def test_applied_keys_report_and_plan_use_the_same_words_and_conflicts_say_again_only_when_it_is():
    from helpers import registry_with, scaled_linear_patcher
    from torch import nn

    import patchkit

    registry = registry_with(
        scaled_linear_patcher(),
        patchkit.Patcher(name="a1", kind="attention", family="one", match=nn.ReLU, build=lambda m, c: None),
        patchkit.Patcher(name="a2", kind="attention", family="two", match=nn.ReLU, build=lambda m, c: None),
    )
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    assert str(patchkit.plan(model, patch="scale", registry=registry)).startswith("patch=scale: 1 to patch")
    report = patchkit.apply(model, patch="scale", attention="one", registry=registry)
    assert patchkit.applied(model) == {"attention": "one", "patch:scale": "scale"}
    assert str(report).startswith("patchkit applied attention=one, patch=scale: 2 patched")
    with pytest.raises(patchkit.ConflictError, match=r"^patch=scale is already applied .* applying patch=scale again$"):
        patchkit.apply(model, patch="scale", registry=registry)
    with pytest.raises(patchkit.ConflictError) as info:
        patchkit.apply(model, attention="two", registry=registry)  # a first apply of attention=two
    assert "attention=one is already applied" in str(info.value) and "again" not in str(info.value)
    with pytest.raises(patchkit.ArgumentError, match=r"Sequential has none.*patchkit.reverse\(model\)"):
        patchkit.save_pretrained(model, "unused")  # a plain torch model has no save_pretrained to call
    patchkit.reverse(model)
