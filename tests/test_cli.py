"""The `nsa-hf` command line: help, conversion with printed report, JSON output, and errors."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from nsa_hf.cli import main

SMALL_ARGS = ["--cmp-block", "8", "--cmp-stride", "4", "--slc-block", "16", "--slc-count", "4",
              "--init-blocks", "1", "--local-blocks", "2", "--window", "32"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(path)
    return path


def test_help_from_the_installed_script():
    exe = shutil.which("nsa-hf")
    cmd = [exe] if exe else [sys.executable, "-m", "nsa_hf.cli"]
    out = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "convert" in out.stdout


def test_convert_help_lists_the_nsa_settings(capsys):
    with pytest.raises(SystemExit) as info:
        main(["convert", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--cmp-block", "--cmp-stride", "--slc-block", "--slc-count", "--init-blocks", "--local-blocks",
                 "--window", "--sample-text", "--dtype"):
        assert flag in out


def test_no_command_prints_help(capsys):
    assert main([]) == 1
    assert "convert" in capsys.readouterr().out


def test_convert_prints_the_report_and_saves(llama_dir, tmp_path, capsys):
    text = tmp_path / "sample.txt"
    text.write_text("for i in range(10):\n    print(i * i)\n" * 60)
    dst = tmp_path / "nsa"
    assert main(["convert", str(llama_dir), str(dst), *SMALL_ARGS, "--sample-text", str(text),
                 "--eval-sequences", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "window=32" in out and "loss original" in out and "converted (untrained NSA)" in out
    assert f"sample.txt" in out and "attend sparsely" in out
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["model_type"] == "nsa_llama" and cfg["nsa_slc_count"] == 4 and cfg["nsa_window"] == 32
    assert (dst / "model.safetensors").is_file() and (dst / "README.md").is_file()


def test_convert_json_output(llama_dir, tmp_path, capsys):
    assert main(["convert", str(llama_dir), str(tmp_path / "nsa"), *SMALL_ARGS, "--no-eval", "--json",
                 "--dtype", "bfloat16", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dtype"] == "bfloat16" and report["nsa_settings"]["slc_block"] == 16
    assert report["loss_original"] is None and report["weights_copied"] > 0


def test_convert_errors_exit_2_with_the_reason(llama_dir, tmp_path, capsys):
    assert main(["convert", str(llama_dir), str(tmp_path / "x"), "--cmp-block", "8", "--cmp-stride", "3"]) == 2
    err = capsys.readouterr().err
    assert "cmp_block" in err and "error" in err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit, match="no such file"):
        main(["convert", str(llama_dir), str(tmp_path / "y"), "--sample-text", str(tmp_path / "missing.txt")])
    with pytest.raises(SystemExit):  # argparse: not an integer
        main(["convert", str(llama_dir), str(tmp_path / "z"), "--window", "big"])
