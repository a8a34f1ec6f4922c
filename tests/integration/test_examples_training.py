"""The Trainer and LoRA examples end to end on a tiny converted model (CPU, a few steps)."""
import sys
from pathlib import Path

import pytest
import torch
from tests.hf.test_convert import SMALL, tiny_llama, tiny_tokenizer
from tests.hf.test_hub import assert_loads_without_nsa_hf
from transformers import AutoModelForCausalLM

import nsa_kernels.compression
import nsa_kernels.reference
from nsa_hf.convert import convert_llama_to_nsa

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))


@pytest.fixture(scope="module")
def nsa_dir_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    docs = [Path(module.__file__).read_text() for module in (nsa_kernels.reference, nsa_kernels.compression)]
    data = []
    for i, d in enumerate(docs):
        (root / f"doc{i}.txt").write_text(d)
        data.append(str(root / f"doc{i}.txt"))
    tok = tiny_tokenizer(docs)
    convert_llama_to_nsa(tiny_llama(), root / "nsa", tokenizer=tok, evaluate=False, progress=False, remote_code=False,
                         **SMALL)
    return root, data


def test_train_script_two_phases_and_resume(nsa_dir_and_data, capsys, tmp_path):
    import train
    from transformers import AutoTokenizer

    root, data = nsa_dir_and_data
    out = root / "run"
    # --max-steps is the total: 2 NSA-only steps, then 4 with all weights.
    args = ["--model", str(root / "nsa"), "--data", *data, "--output-dir", str(out), "--seq-len", "96",
            "--batch-size", "4", "--max-steps", "6", "--nsa-only-steps", "2", "--logging-steps", "1",
            "--save-steps", "2", "--lr", "3e-3"]
    history = train.main(args)
    assert len(history) == 6 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert all(h["tokens_per_second"] > 0 for h in history[1:])
    printed = capsys.readouterr().out
    # One line per logged step (the Trainer's, with the throughput added), not two.
    assert printed.count("'loss'") == 6 and printed.count("'tokens_per_second'") == 6 and "[train] step" not in printed, printed
    before = AutoModelForCausalLM.from_pretrained(root / "nsa")
    after = AutoModelForCausalLM.from_pretrained(out / "final")
    sb, sa = before.state_dict(), after.state_dict()
    assert any(not torch.equal(sb[k], sa[k]) for k in sb if "nsa_gate" in k)
    assert any(not torch.equal(sb[k], sa[k]) for k in sb if "q_proj" in k)
    # The final folder loads as remote code where nsa-hf is not installed, tokenizer included.
    assert_loads_without_nsa_hf(out / "final", tmp_path, after, AutoTokenizer.from_pretrained(out / "final"))
    # Resuming a finished run continues from its last checkpoint and trains no further steps.
    assert (out / "phase2-all" / "checkpoint-4").is_dir()
    train.main(args + ["--resume"])


def test_train_script_alignment_warmup(nsa_dir_and_data, monkeypatch):
    """--align-weight with --align-in warmup: the NSA-only step has the selection alignment term, the full step
    not; the saved model does not carry the training setting."""
    import json

    import train
    from nsa_hf.alignment import SelectionAlignment

    calls = []
    original = SelectionAlignment.loss

    def counting(self):
        loss = original(self)
        calls.append(len(self.losses))
        return loss

    monkeypatch.setattr(SelectionAlignment, "loss", counting)
    root, data = nsa_dir_and_data
    out = root / "aligned"
    history = train.main(["--model", str(root / "nsa"), "--data", *data, "--output-dir", str(out), "--seq-len", "96",
                          "--batch-size", "2", "--max-steps", "2", "--nsa-only-steps", "1", "--logging-steps", "1",
                          "--align-weight", "0.5", "--align-rows", "8", "--align-in", "warmup"])
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    n_layers = AutoModelForCausalLM.from_pretrained(root / "nsa").config.num_hidden_layers
    assert calls == [n_layers]  # one training forward with the term, every NSA layer contributing
    config = json.loads((out / "final" / "config.json").read_text())
    assert "nsa_align_weight" not in config and "nsa_align_rows" not in config


def test_train_script_command_line_errors(nsa_dir_and_data, capsys):
    """Bad values end with one line naming the value and exit status 2, before any model is loaded."""
    import train

    root, data = nsa_dir_and_data
    base = ["--model", str(root / "nsa"), "--output-dir", str(root / "never")]
    for extra, expected in (
        (["--data", "missing.txt"], "'missing.txt' not found"),
        (["--data", data[0], str(root / "nope.txt")], "nope.txt' not found"),
        (["--data", *data, "--max-steps", "6", "--nsa-only-steps", "6"], "--nsa-only-steps 6"),
        (["--data", *data, "--seq-len", "0"], "--seq-len 0"),
        (["--data", *data, "--align-weight", "-1"], "--align-weight -1.0"),
        (["--data", *data, "--align-weight", "nan"], "--align-weight nan"),
        (["--data", *data, "--align-rows", "0"], "--align-rows 0"),
        (["--data", *data, "--align-weight", "1", "--align-in", "warmup"], "--align-in warmup: needs --nsa-only-steps"),
    ):
        with pytest.raises(SystemExit) as info:
            train.main(base + extra)
        err = capsys.readouterr().err.strip()
        assert info.value.code == 2 and expected in err and len(err.splitlines()) == 1, err
        assert "Hub" not in err or "Hub dataset id" in err
    assert not (root / "never").exists()
    import lora

    with pytest.raises(SystemExit) as info:
        lora.main(base + ["--data", "missing.txt"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.startswith("lora.py: error: --data: data file 'missing.txt' not found"), err


@pytest.mark.parametrize("script", ["train", "lora"])
def test_every_example_flag_has_help(script):
    import importlib

    module = importlib.import_module(script)
    parser = module.build_parser()
    missing = [a.option_strings for a in parser._actions if not a.help]
    assert not missing, f"{script}: flags without help: {missing}"


def test_lora_script_saves_adapter_and_merges(nsa_dir_and_data, tmp_path):
    import lora

    root, data = nsa_dir_and_data
    out = root / "lora"
    lora.main(["--model", str(root / "nsa"), "--data", *data, "--output-dir", str(out), "--seq-len", "96",
               "--batch-size", "4", "--max-steps", "3", "--logging-steps", "1", "--lr", "3e-3"])
    assert (out / "adapter" / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(root / "nsa")
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    sb, sm = base.state_dict(), merged.state_dict()
    assert set(sb) == set(sm)  # a plain NSA-Llama checkpoint: no lora_* or modules_to_save keys left
    assert any(not torch.equal(sb[k], sm[k]) for k in sb if "nsa_gate" in k)
    assert any(not torch.equal(sb[k], sm[k]) for k in sb if k.endswith("q_proj.weight"))
    # The merged folder loads as remote code where nsa-hf is not installed.
    assert_loads_without_nsa_hf(out / "merged", tmp_path, merged)


def test_train_script_loss_log_is_independent_of_the_micro_batch_split(nsa_dir_and_data):
    """--sequential --log-file: one micro-batch of 2 pieces and 2 accumulated micro-batches of 1 piece
    train on the same pieces per step with the same token-mean loss (what makes 1-GPU vs FSDP runs
    comparable); compare_losses agrees, and flags a different run."""
    import json

    import compare_losses
    import train

    root, data = nsa_dir_and_data
    common = ["--model", str(root / "nsa"), "--data", *data, "--seq-len", "64", "--max-steps", "3",
              "--logging-steps", "1", "--save-steps", "100", "--lr", "3e-3", "--sequential", "--no-save"]
    logs = {}
    for name, split in (("packed", ["--batch-size", "2", "--grad-accum", "1"]),
                        ("accum", ["--batch-size", "1", "--grad-accum", "2"]),
                        ("other_seed", ["--batch-size", "1", "--grad-accum", "2", "--seed", "5"])):
        logs[name] = root / f"loss-{name}.json"
        train.main(common + split + ["--output-dir", str(root / f"run-{name}"), "--log-file", str(logs[name])])
    records = json.loads(logs["accum"].read_text())
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["world_size"] == 1 for r in records)
    assert all(r["tokens_per_second"] > 0 for r in records)  # the throughput callback's number, logged too
    assert not (root / "run-accum" / "final").exists()  # --no-save
    assert compare_losses.main([str(logs["packed"]), str(logs["accum"]), "--tolerance", "1e-4"]) == 0
    assert compare_losses.main([str(logs["accum"]), str(logs["other_seed"]), "--tolerance", "1e-4"]) == 1


def test_compare_losses_exit_codes(tmp_path):
    import json

    import compare_losses

    def write(name, losses, phase="all"):
        path = tmp_path / name
        path.write_text(json.dumps([{"phase": phase, "step": i + 1, "loss": v} for i, v in enumerate(losses)]))
        return str(path)

    a = write("a.json", [8.0, 7.0, 6.0])
    assert compare_losses.main([a, write("b.json", [8.0, 7.0035, 6.0]), "--tolerance", "1e-3"]) == 0
    assert compare_losses.main([a, write("c.json", [8.0, 7.01, 6.0]), "--tolerance", "1e-3"]) == 1
    assert compare_losses.main([a, write("d.json", [8.0, 7.0]), "--tolerance", "1e-3"]) == 2
    assert compare_losses.main([a, write("e.json", [8.0, 7.0, 6.0], phase="nsa"), "--tolerance", "1"]) == 2
    assert compare_losses.main([a, write("f.json", [8.0, float("nan"), 6.0]), "--tolerance", "1"]) == 1
    lines = tmp_path / "g.jsonl"
    lines.write_text('{"phase": "all", "step": 1, "loss": 8.0}\n{"phase": "all", "step": 2, "loss": 7.0}\n'
                     '{"phase": "all", "step": 3, "loss": 6.0}\n')
    assert compare_losses.main([a, str(lines)]) == 0


def test_fsdp_config_gives_fsdp2_wrapping_nsa_layers(monkeypatch):
    """examples/fsdp.yaml through accelerate's own launcher parsing: FSDP2, full shard, bf16, the NSA
    decoder layer as the wrap unit (a class the model really has); the plugin builds from that env."""
    import subprocess

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    from nsa_hf.modeling_nsa_llama import NSALlamaDecoderLayer

    repo = Path(__file__).resolve().parents[2]
    parsed = launch_command_parser().parse_args(
        ["--config_file", str(repo / "examples" / "fsdp.yaml"), str(repo / "examples" / "train.py")])
    out = _validate_launch_command(parsed)
    args = out[0] if isinstance(out, tuple) else parsed
    assert args.use_fsdp and args.num_processes == 2 and args.mixed_precision == "bf16"
    env = prepare_multi_gpu_env(args)
    assert env["FSDP_VERSION"] == "2" and env["FSDP_RESHARD_AFTER_FORWARD"] == "true"
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == NSALlamaDecoderLayer.__name__
    for key, value in env.items():
        if key.startswith("FSDP_"):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert list(plugin.transformer_cls_names_to_wrap) == ["NSALlamaDecoderLayer"]
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
    assert subprocess.run(["bash", "-n", str(repo / "examples" / "fsdp_check.sh")]).returncode == 0


def test_two_processes_match_one_process_with_grad_accum(nsa_dir_and_data):
    """torchrun with 2 CPU processes (gloo, DDP) and --batch-size 1 vs one process with --grad-accum 2:
    with --sequential the per-step losses agree (same pieces per step, token-mean loss over the global
    batch), which is what the FSDP check relies on; FSDP itself needs GPUs (examples/fsdp_check.sh)."""
    import json
    import os
    import subprocess

    import train

    root, data = nsa_dir_and_data
    repo = Path(__file__).resolve().parents[2]
    common = ["--model", str(root / "nsa"), "--data", *data, "--seq-len", "64", "--max-steps", "2",
              "--logging-steps", "1", "--save-steps", "100", "--lr", "3e-3", "--sequential"]
    train.main(common + ["--batch-size", "1", "--grad-accum", "2", "--output-dir", str(root / "run-1proc"),
                         "--log-file", str(root / "loss-1proc.json")])
    env = dict(os.environ, HF_DATASETS_CACHE=str(root / "datasets-2proc"), OMP_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(repo / "examples" / "train.py"), *common, "--batch-size", "1", "--grad-accum", "1",
           "--output-dir", str(root / "run-2proc"), "--log-file", str(root / "loss-2proc.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=repo)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one = json.loads((root / "loss-1proc.json").read_text())
    two = json.loads((root / "loss-2proc.json").read_text())
    assert [r["world_size"] for r in two] == [2, 2] and [r["world_size"] for r in one] == [1, 1]
    assert [r["fsdp_units"] for r in one + two] == [0] * 4  # DDP: nothing sharded (the FSDP check requires > 0)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    # Both write the trained model once (under DDP rank 0 writes, nsa_hf.training.save_trained_model),
    # and the two trained the same weights.
    saved = [AutoModelForCausalLM.from_pretrained(root / run / "final").state_dict()
             for run in ("run-1proc", "run-2proc")]
    start = AutoModelForCausalLM.from_pretrained(root / "nsa").state_dict()
    assert set(saved[0]) == set(saved[1]) == set(start)
    for name in start:
        torch.testing.assert_close(saved[1][name], saved[0][name], rtol=1e-4, atol=1e-5, msg=name)
    assert any(not torch.equal(saved[0][name], start[name]) for name in start)


def test_gradient_checkpointing_flag_reaches_training_arguments(tmp_path):
    """--gradient-checkpointing sets the Trainer's activation checkpointing under the name the installed
    transformers uses, without its deprecation warning for the old name."""
    import warnings

    import train

    from nsa_hf.training import checkpointing_argument, training_arguments

    (tmp_path / "d.txt").write_text("x")
    base = ["--model", "m", "--data", str(tmp_path / "d.txt"), "--output-dir", str(tmp_path)]
    name = next(iter(checkpointing_argument(True)))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
        on = training_arguments(train.parse_args(base + ["--gradient-checkpointing"]), str(tmp_path), 1, 1e-4)
        off = training_arguments(train.parse_args(base), str(tmp_path), 1, 1e-4)
    assert getattr(on, name) is True and getattr(off, name) is False
