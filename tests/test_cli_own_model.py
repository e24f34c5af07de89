"""`patchkit quantize` and `patchkit bench` on tiny checkpoints the tests write (issue 22)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from patchkit.cli import main

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the a cat dog sat on mat ran far away and then slept in sun".split()


def run_cli(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    """The command in a fresh process, stdout and stderr piped (not terminals)."""
    paths = [str(ROOT / "src"), str(ROOT / "plugins"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    command = ["-c", code, *args] if code else ["-m", "patchkit.cli", *args]
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env, timeout=300)


def own_lines(stderr: str) -> list[str]:
    """stderr without third-party chatter (bitsandbytes' kernel-hub warning on the CPU)."""
    return [line for line in stderr.splitlines() if line.strip() and "kernels-community" not in line]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny OPT (9 shards), Llama (one file, generation config) and BERT (with a tokenizer) folders."""
    root = tmp_path_factory.mktemp("own")
    torch.manual_seed(0)
    opt = transformers.OPTForCausalLM(
        transformers.OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=128,
            word_embed_proj_dim=64,
            max_position_embeddings=128,
        )
    )
    opt.save_pretrained(root / "opt", max_shard_size="50KB")
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=0,
        )
    )
    llama.save_pretrained(root / "llama")
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=len(WORDS) + 5,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )
    bert.save_pretrained(root / "bert")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(root / "bert")
    (root / "inputs.txt").write_text("the cat sat on the mat\nthe dog ran far away and then slept in the sun\na cat\n")
    return {"opt": root / "opt", "llama": root / "llama", "bert": root / "bert", "inputs": root / "inputs.txt"}


# ------------------------------------------------------------------------------------------ quantize


def test_quantize_writes_what_save_pretrained_writes_and_transformers_reloads(checkpoints, tmp_path):
    pytest.importorskip("bitsandbytes")
    import patchkit

    dest = tmp_path / "out" / "opt-nf4"  # a missing parent is created
    result = run_cli("quantize", str(checkpoints["opt"]), str(dest), "--quantize", "nf4")
    assert result.returncode == 0, result.stderr
    assert f"wrote {dest}" in result.stdout and "quantized=nf4" in result.stdout
    assert not any("patchkit:" in line for line in own_lines(result.stderr)), "a progress bar while piped"
    assert sorted(os.listdir(tmp_path / "out")) == ["opt-nf4"]  # no temporary folder left beside it
    # The same bytes as the library route: from_pretrained + save_pretrained(quantized=True).
    model = patchkit.from_pretrained(transformers.OPTForCausalLM, checkpoints["opt"], quantize="nf4", progress=False)
    patchkit.save_pretrained(model, tmp_path / "library", quantized=True)
    assert (dest / "model.safetensors").read_bytes() == (tmp_path / "library" / "model.safetensors").read_bytes()
    assert json.loads((dest / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    # transformers reloads it quantized, close to the full-precision model
    import bitsandbytes as bnb

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(dest).eval()
    quantized = {n for n, m in reloaded.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert "model.decoder.layers.0.self_attn.q_proj" in quantized and len(quantized) == 12
    full = transformers.OPTForCausalLM.from_pretrained(checkpoints["opt"]).eval()
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = reloaded(input_ids=ids).logits, full(input_ids=ids).logits
    assert torch.isfinite(a).all() and (a - b).abs().max() < 0.5 * b.abs().max()


def test_quantize_refuses_an_existing_dest_unless_overwrite(checkpoints, tmp_path):
    pytest.importorskip("bitsandbytes")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    assert main(["quantize", str(checkpoints["llama"]), str(dest), "--quantize", "int8"]) == 2
    assert (dest / "keep.txt").read_text() == "mine"
    assert main(["quantize", str(checkpoints["llama"]), str(dest), "--quantize", "int8", "--overwrite"]) == 0
    assert not (dest / "keep.txt").exists() and (dest / "model.safetensors").is_file()
    assert (dest / "generation_config.json").is_file()
    assert json.loads((dest / "config.json").read_text())["quantization_config"]["load_in_8bit"]
    assert sorted(os.listdir(tmp_path)) == ["dest"]


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _shard(src: Path, i: int) -> Path:
    index = json.loads((src / "model.safetensors.index.json").read_text())
    return src / sorted(set(index["weight_map"].values()))[i]


def _bad_missing_shard(ckpt: Path, tmp: Path) -> tuple[Path, Path, str]:
    src = _copy(ckpt, tmp / "src")
    shard = _shard(src, 2)
    shard.unlink()
    return src, tmp / "dest", shard.name


def _bad_truncated(ckpt: Path, tmp: Path) -> tuple[Path, Path, str]:
    src = _copy(ckpt, tmp / "src")
    shard = _shard(src, -1)
    shard.write_bytes(shard.read_bytes()[:-100])
    return src, tmp / "dest", shard.name


def _bad_dtype(ckpt: Path, tmp: Path) -> tuple[Path, Path, str]:
    from safetensors.torch import load_file, save_file

    src = _copy(ckpt, tmp / "src")
    shard = _shard(src, 1)
    tensors = load_file(shard)
    name = next(iter(tensors))
    tensors[name] = tensors[name].to(torch.int32)  # integers where the model has floating weights
    save_file(tensors, shard, metadata={"format": "pt"})
    return src, tmp / "dest", name


def _bad_unwritable(ckpt: Path, tmp: Path) -> tuple[Path, Path, str]:
    (tmp / "a-file").write_text("not a folder")
    return ckpt, tmp / "a-file" / "dest", "a-file"


def _bad_no_source(ckpt: Path, tmp: Path) -> tuple[Path, Path, str]:
    return tmp / "nowhere", tmp / "dest", "nowhere"


def _bad_config_only(ckpt: Path, tmp: Path) -> tuple[Path, Path, str]:
    (tmp / "src").mkdir()
    (tmp / "src" / "config.json").write_text((ckpt / "config.json").read_text())
    return tmp / "src", tmp / "dest", "safetensors"


BAD = {
    "missing shard": _bad_missing_shard,
    "truncated file": _bad_truncated,
    "wrong dtype": _bad_dtype,
    "unwritable dest": _bad_unwritable,
    "no source": _bad_no_source,
    "no weights": _bad_config_only,
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_quantize_bad_input_is_one_line_exit_2_and_no_dest(case, checkpoints, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    src, dest, needle = BAD[case](checkpoints["opt"], tmp_path)
    before = sorted(os.listdir(tmp_path))
    assert main(["quantize", str(src), str(dest), "--quantize", "nf4"]) == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("patchkit quantize: "), err
    assert needle in err[0], err
    assert not dest.exists()
    assert sorted(os.listdir(tmp_path)) == before  # no temporary folder left behind


# ------------------------------------------------------------------------------------------ bench


def test_bench_real_inputs_exactness_speed_memory_reverse(checkpoints, capsys):
    code = main(
        ["bench", str(checkpoints["bert"]), "--attention", "sdpa", "--padding", str(checkpoints["inputs"])]
        + ["--batch", "4x32", "--repeats", "2"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "BertModel from" in out and "weights from the checkpoint" in out
    assert "BertEncoder -> SdpaBertEncoder" in out  # the apply report
    assert "(right-padded, " in out and "inputs.txt), forward" in out
    line = next(
        line for line in out.splitlines() if line.startswith("outputs on real tokens: max |patched - original|")
    )
    assert float(line.split("= ")[1].split()[0]) <= 1e-4
    assert "median of 2 alternating runs, per-pair range" in out and f"{torch.get_num_threads()} threads" in out
    assert "peak memory growth during a call: original" in out
    assert "reverse restored the original exactly (same module and parameter objects, same bytes): yes" in out
    assert out.rstrip().endswith("bench OK")


def test_bench_json_schema_generate_on_a_config_alone(checkpoints, capsys):
    code = main(
        ["bench", str(checkpoints["llama"] / "config.json"), "--attention", "flash2", "--backend", "reference"]
        + ["--batch", "3x16", "--padding", "40%", "--generate", "3", "--repeats", "2", "--json"]
    )
    out = capsys.readouterr().out
    result = json.loads(out)  # nothing but the JSON object on stdout
    assert code == 0 and result["ok"] is True
    assert result["schema"] == "patchkit-bench/1" and result["random_weights"] is True
    assert result["model_class"] == "LlamaForCausalLM" and result["dtype"] == "float32"
    assert result["apply"]["applied"] == {"attention": "flash2"} and result["apply"]["swaps"] == 2
    assert result["workload"] == {
        "batch": 3,
        "seq": 16,
        "padding": 0.4,
        "inputs": None,
        "generate": 3,
        "padding_side": "left",
    }
    (point,) = result["points"]
    assert point["exactness"]["metric"] == "greedy_tokens_equal"
    assert point["exactness"]["value"] is True and point["exactness"]["rows_equal"] == 3
    assert abs(point["padding"] - 0.4) < 0.05
    speed = point["speed"]
    assert len(speed["original_runs_ms"]) == len(speed["patched_runs_ms"]) == speed["repeats"] == 2
    assert speed["pair_range"][0] <= speed["speedup"] <= speed["pair_range"][1]
    assert speed["patched_tokens_per_s"] > 0 and speed["threads"] == torch.get_num_threads()
    assert set(point["memory"]) == {"original_peak_growth_mib", "patched_peak_growth_mib"}
    assert result["reverse"] == {"same_objects": True, "bit_exact": True, "still_patched": False, "ok": True}


def test_bench_quantize_reports_the_error_and_the_lossy_reverse(checkpoints, capsys):
    pytest.importorskip("bitsandbytes")
    assert main(["bench", str(checkpoints["opt"]), "--quantize", "nf4", "--batch", "2x16", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "a quantizer is not exact, not judged" in out
    assert "same bytes): NO" in out and "keep_original=cpu" in out
    assert (
        main(
            ["bench", str(checkpoints["opt"]), "--quantize", "nf4", "--batch", "2x16", "--repeats", "1"]
            + ["-o", "keep_original=cpu", "--json"]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["reverse"]["bit_exact"] is True and result["points"][0]["exactness"]["ok"] is None
    assert result["model_mib"]["patched"] < 0.6 * result["model_mib"]["original"]


def test_bench_sweep_and_plot(checkpoints, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "speed.png"
    args = ["bench", str(checkpoints["bert"]), "--attention", "sdpa", "--batch", "4x24", "--repeats", "1"]
    assert main([*args, "--sweep", "padding", "--plot", str(png), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    shares = [p["padding"] for p in result["points"]]
    assert len(shares) == 7 and shares[0] == 0 and shares == sorted(shares) and 0.55 < shares[-1] < 0.65
    assert all(p["exactness"]["ok"] for p in result["points"]) and result["sweep"] == "padding"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert main([*args, "--sweep", "padding", "--padding", "0.2"]) == 0  # --padding is ignored by the sweep
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.strip().endswith("x") and "%" in line]
    assert len(rows) == 7 and rows[0].split()[0] == "0%", out


def test_bench_plot_without_matplotlib_says_how_to_install(checkpoints, tmp_path):
    code = "import sys; sys.modules['matplotlib'] = None; from patchkit.cli import main; sys.exit(main(sys.argv[1:]))"
    args = [str(checkpoints["bert"]), "--attention", "sdpa", "--sweep", "padding", "--plot", str(tmp_path / "p.png")]
    result = run_cli("bench", *args, code=code)
    assert result.returncode == 2
    (line,) = own_lines(result.stderr)
    assert "pip install 'patchkit[plot]'" in line
    assert not (tmp_path / "p.png").exists()


def test_bench_progress_silent_when_not_a_terminal_and_shown_when_forced(checkpoints, capsys):
    # stderr here is pytest's capture, not a terminal: as when piped, no bar by default
    args = ["bench", str(checkpoints["bert"]), "--attention", "sdpa", "--batch", "2x16", "--repeats", "2"]
    assert not sys.stderr.isatty()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert own_lines(err) == [] and "\r" not in err
    assert main([*args, "--progress"]) == 0
    assert "patchkit: timing (30% padding)" in capsys.readouterr().err


def test_bench_fails_when_outputs_differ_beyond_the_tolerance(checkpoints, capsys):
    # A negative tolerance no difference meets: the verdict, the marker and the exit status follow it.
    args = ["bench", str(checkpoints["bert"]), "--attention", "sdpa", "--batch", "2x16", "--repeats", "1"]
    assert main([*args, "--tolerance", "-1"]) == 1
    out = capsys.readouterr().out
    assert "<- FAILED" in out and out.rstrip().endswith("bench FAILED")


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--batch", "32"], "expected BATCHxSEQ"),
        (["--padding", "1.5"], "must be in [0, 1)"),
        (["--padding", "no-such-file.txt"], "or a text file"),
        (["--plot", "x.png"], "add --sweep padding"),
        (["--sweep", "padding", "--plot", "x.pdf"], ".png or .svg"),
        (["--repeats", "0"], "at least 1"),
        (["--dtype", "int8"], "floating torch dtype"),
        (["--generate", "2"], "cannot generate"),
        (["--attention", "flash2"], "--backend reference"),
    ],
)
def test_bench_bad_input_is_one_line_exit_2(extra, needle, checkpoints, capsys):
    source = checkpoints["llama"] if "flash2" in extra else checkpoints["bert"]
    attention = [] if "--attention" in extra else ["--attention", "sdpa"]
    assert main(["bench", str(source), *attention, *extra]) == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("patchkit bench: ") and needle in err[0], err


def test_bench_bad_source_and_missing_tokenizer(checkpoints, tmp_path, capsys):
    assert main(["bench", str(tmp_path / "nowhere"), "--attention", "sdpa"]) == 2
    assert main(["bench", str(checkpoints["bert"])]) == 2  # nothing requested
    assert main(["bench", str(checkpoints["opt"]), "--quantize", "nf4", "--padding", str(checkpoints["inputs"])]) == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 3 and "nowhere" in err[0] and "nothing to bench" in err[1]
    assert "real inputs need a tokenizer" in err[2]
