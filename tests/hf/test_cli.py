"""The `nsa-hf` command line: help and version without torch, conversion with printed report, JSON output,
and errors."""
import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import nsa_hf.cli
from nsa_hf_cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "nsa_hf", "nsa_kernels")

SMALL_ARGS = ["--cmp-block", "8", "--cmp-stride", "4", "--slc-block", "16", "--slc-count", "4",
              "--init-blocks", "1", "--local-blocks", "2", "--window", "32"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(path)
    return path


LIGHT_PROBE = """
import contextlib, io, json, sys
import nsa_hf_cli
runs = {}
for argv in (["--help"], ["--version"], ["convert", "--help"]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            nsa_hf_cli.main(argv)
            code = "returned"
        except SystemExit as exit:
            code = exit.code
    runs[" ".join(argv)] = {"code": code, "out": out.getvalue()}
print(json.dumps({"runs": runs, "imported": sorted(name for name in %r if name in sys.modules)}))
""" % (HEAVY,)


def test_help_and_version_import_neither_torch_nor_nsa_hf():
    """The entry module answers --help, --version and convert --help on the standard library alone."""
    done = subprocess.run([sys.executable, "-c", LIGHT_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["imported"] == [], seen["imported"]
    runs = seen["runs"]
    assert all(run["code"] == 0 for run in runs.values()), {argv: run["code"] for argv, run in runs.items()}
    assert "convert" in runs["--help"]["out"]
    assert runs["--version"]["out"].strip() == f"nsa-hf {importlib.metadata.version('nsa-hf')}"
    assert "--cmp-block" in runs["convert --help"]["out"] and "--sample-text" in runs["convert --help"]["out"]


def test_the_package_module_is_the_same_command_line():
    """`python -m nsa_hf.cli` and `from nsa_hf.cli import main` keep working: the same parser and entry."""
    assert nsa_hf.cli.main is main and nsa_hf.cli.build_parser is build_parser
    done = subprocess.run([sys.executable, "-m", "nsa_hf.cli", "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "convert" in done.stdout


def test_the_installed_script_answers_help_without_torch():
    """The console script that `pip install -e .` wrote beside this interpreter (its entry point must be
    nsa_hf_cli:main); `python -X importtime` lists every module it imports."""
    script = Path(sys.executable).with_name("nsa-hf")
    script = str(script) if script.is_file() else shutil.which("nsa-hf")
    if script is None:
        pytest.skip("no nsa-hf script installed in this environment")
    done = subprocess.run([sys.executable, "-X", "importtime", script, "--help"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"{script}: {done.stderr[-3000:]} (an install older than the entry module "\
        "nsa_hf_cli: reinstall with pip install -e .)"
    assert "convert" in done.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    heavy = sorted(name for name in imported if name.split(".")[0] in HEAVY)
    assert not heavy, f"{script} --help imported {heavy[:5]}: its entry point is not nsa_hf_cli:main (reinstall with pip install -e .)"


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
    assert report["dtype"] == "bfloat16" and report["source_dtype"] == "float32"
    assert report["nsa_settings"]["slc_block"] == 16
    assert report["loss_original"] is None and report["weights_copied"] > 0


def test_convert_flags_are_the_nsa_params_fields():
    import dataclasses

    from nsa_kernels import NSAParams

    conv = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "convert")[1]
    dests = {a.dest for a in conv._actions}
    assert {f.name for f in dataclasses.fields(NSAParams)} <= dests


def _one_error_line(capsys, *parts):
    err = capsys.readouterr().err
    assert err.startswith("nsa-hf convert: error: ") and err.count("\n") == 1, err
    for part in parts:
        assert part in err, (part, err)


def test_convert_errors_exit_2_with_one_line(llama_dir, tmp_path, capsys):
    assert main(["convert", str(llama_dir), str(tmp_path / "x"), "--cmp-block", "8", "--cmp-stride", "3"]) == 2
    _one_error_line(capsys, "cmp_block=8")
    assert not (tmp_path / "x").exists()
    assert main(["convert", str(llama_dir), str(tmp_path / "y"), "--sample-text", str(tmp_path / "missing.txt")]) == 2
    _one_error_line(capsys, "missing.txt", "no such file")
    assert main(["convert", "./missing", str(tmp_path / "y")]) == 2
    _one_error_line(capsys, "'./missing'", "neither an existing directory nor a Hub model id")
    assert main(["convert", str(llama_dir), str(tmp_path / "y"), *SMALL_ARGS, "--eval-len", "100000"]) == 2
    _one_error_line(capsys, "eval_len=100000", "max_position_embeddings=2048")
    if not torch.cuda.is_available():
        assert main(["convert", str(llama_dir), str(tmp_path / "y"), "--device", "cuda"]) == 2
        _one_error_line(capsys, "device='cuda'", "--device cpu")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "old.txt").write_text("stale")
    assert main(["convert", str(llama_dir), str(occupied), *SMALL_ARGS, "--no-eval", "--quiet"]) == 2
    _one_error_line(capsys, str(occupied), "--overwrite")
    assert main(["convert", str(llama_dir), str(occupied), *SMALL_ARGS, "--no-eval", "--quiet", "--overwrite"]) == 0
    assert not (occupied / "old.txt").exists() and (occupied / "config.json").is_file()
    with pytest.raises(SystemExit):  # argparse: not an integer
        main(["convert", str(llama_dir), str(tmp_path / "z"), "--window", "big"])


def test_convert_refuses_other_model_types_and_offline_hub_ids(tmp_path, capsys, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "gpt2"), str(tmp_path / "out")]) == 2
    _one_error_line(capsys, "model_type 'gpt2'", "'llama', 'mistral', 'qwen2', 'qwen3'")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["convert", "nsa-hf-tests/no-such-model", str(tmp_path / "out")]) == 2
    _one_error_line(capsys, "'nsa-hf-tests/no-such-model'", "HF_HUB_OFFLINE")


def test_convert_no_remote_code(llama_dir, tmp_path, capsys):
    assert main(["convert", str(llama_dir), str(tmp_path / "plain"), *SMALL_ARGS, "--no-eval", "--quiet",
                 "--no-remote-code"]) == 0
    assert not list((tmp_path / "plain").glob("*.py"))
    assert "auto_map" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "trust_remote_code=True)" not in (tmp_path / "plain" / "README.md").read_text()
