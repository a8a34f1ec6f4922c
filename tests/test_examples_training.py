"""The Trainer and LoRA examples end to end on a tiny converted model (CPU, a few steps)."""
import sys
from pathlib import Path

import pytest
import torch
from test_convert import SMALL, tiny_llama, tiny_tokenizer
from transformers import AutoModelForCausalLM

from nsa_hf.convert import convert_llama_to_nsa

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


@pytest.fixture(scope="module")
def nsa_dir_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    docs = [(Path(__file__).resolve().parents[1] / "kernels" / f).read_text() for f in ("reference.py", "compression.py")]
    data = []
    for i, d in enumerate(docs):
        (root / f"doc{i}.txt").write_text(d)
        data.append(str(root / f"doc{i}.txt"))
    tok = tiny_tokenizer(docs)
    convert_llama_to_nsa(tiny_llama(), root / "nsa", tokenizer=tok, evaluate=False, progress=False, **SMALL)
    return root, data


def test_train_script_two_phases_and_resume(nsa_dir_and_data):
    import train

    root, data = nsa_dir_and_data
    out = root / "run"
    args = ["--model", str(root / "nsa"), "--data", *data, "--output-dir", str(out), "--seq-len", "96",
            "--batch-size", "4", "--max-steps", "4", "--nsa-only-steps", "2", "--logging-steps", "1",
            "--save-steps", "2", "--lr", "3e-3"]
    history = train.main(args)
    assert len(history) == 6 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert all(h["tokens_per_second"] > 0 for h in history[1:])
    before = AutoModelForCausalLM.from_pretrained(root / "nsa")
    after = AutoModelForCausalLM.from_pretrained(out / "final")
    sb, sa = before.state_dict(), after.state_dict()
    assert any(not torch.equal(sb[k], sa[k]) for k in sb if "nsa_gate" in k)
    assert any(not torch.equal(sb[k], sa[k]) for k in sb if "q_proj" in k)
    # Resuming a finished run continues from its last checkpoint and trains no further steps.
    assert (out / "phase2-all" / "checkpoint-4").is_dir()
    train.main(args + ["--resume"])


def test_lora_script_saves_adapter_and_merges(nsa_dir_and_data):
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
