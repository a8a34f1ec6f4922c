"""FSDP2 on CPU: two gloo processes (and one) with every NSA decoder layer sharded (``fully_shard``) train
exactly like one process on the same global batch (first only the NSA modules, then all weights), also with
the selection alignment term in the loss (``nsa_align_weight``), and the model they save is an ordinary
NSA-Llama checkpoint whose remote code loads without nsa_hf. (The Trainer /
``accelerate launch`` path on two GPUs is ``examples/fsdp_check.sh``; accelerate runs the Trainer as plain
DDP on CPU.)"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tests.hf.test_convert import SMALL, assert_loads_as_remote_code, tiny_llama
from transformers import AutoModelForCausalLM

from nsa_hf.convert import convert_llama_to_nsa
from nsa_hf.hub import bundle_remote_code

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "integration" / "fsdp_worker.py"


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_cpu")
    # Tied embeddings (as in fsdp_check.sh and small Llamas): the gathered state dict holds the tied weight
    # under both names, and the save must still write it once.
    convert_llama_to_nsa(tiny_llama(tie_word_embeddings=True), root / "nsa", evaluate=False, progress=False,
                         remote_code=False, **SMALL)
    run_workers(root, {
        "one": [sys.executable, str(WORKER), str(root / "nsa"), str(root / "one")],
        "fsdp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 str(WORKER), str(root / "nsa"), str(root / "fsdp"), "--fsdp"],
        # FSDP2 in a single process (as `accelerate launch --num_processes 1` with an FSDP config): the
        # parameters are still sharded DTensors, and saving them must gather them like with two ranks.
        "fsdp1": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                  str(WORKER), str(root / "nsa"), str(root / "fsdp1"), "--fsdp"],
    })
    return root


def run_workers(root: Path, runs: dict) -> None:
    """Run each worker command of ``runs`` (name -> argv) on the CPU, one after the other."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    for name, cmd in runs.items():
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
        assert proc.returncode == 0, (name, proc.stdout[-3000:] + proc.stderr[-3000:])


@pytest.fixture(scope="module")
def align_runs(fsdp_runs):
    """The same training with ``nsa_align_weight = 1`` in one process and in two FSDP processes."""
    run_workers(fsdp_runs, {
        "one_align": [sys.executable, str(WORKER), str(fsdp_runs / "nsa"), str(fsdp_runs / "one_align"),
                      "--align-weight", "1"],
        "fsdp_align": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       str(WORKER), str(fsdp_runs / "nsa"), str(fsdp_runs / "fsdp_align"), "--fsdp",
                       "--align-weight", "1"],
    })
    return fsdp_runs


def saved_tensor_names(folder: Path) -> set:
    with safe_open(folder / "model.safetensors", "pt") as checkpoint:
        return set(checkpoint.keys())


def assert_trained_like_one_process(fsdp_runs, run: str, world_size: int) -> dict:
    """The FSDP ``run`` (``world_size`` processes) sharded every decoder layer and the root, logged the
    one-process reference's losses (1e-5) and saved the same tensors (the tied embedding once, still tied on
    reload) with its weights (1e-4); returns the reference's weights."""
    one = json.loads((fsdp_runs / "one" / "losses.json").read_text())
    sharded = json.loads((fsdp_runs / run / "losses.json").read_text())
    layers = AutoModelForCausalLM.from_pretrained(fsdp_runs / "nsa").config.num_hidden_layers
    assert (one["world_size"], one["fsdp_units"]) == (1, 0)
    assert (sharded["world_size"], sharded["fsdp_units"]) == (world_size, layers + 1)
    assert len(one["losses"]) == 4
    assert sharded["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert saved_tensor_names(fsdp_runs / run) == saved_tensor_names(fsdp_runs / "one")
    reloaded = AutoModelForCausalLM.from_pretrained(fsdp_runs / run)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight  # still tied
    a = AutoModelForCausalLM.from_pretrained(fsdp_runs / "one").state_dict()
    b = reloaded.state_dict()
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    return a


def test_fsdp_two_ranks_train_like_one_process(fsdp_runs):
    a = assert_trained_like_one_process(fsdp_runs, "fsdp", 2)
    start = AutoModelForCausalLM.from_pretrained(fsdp_runs / "nsa").state_dict()
    # Training moved every parameter, the compressors included (a rank had no complete compression block
    # at step 2: its compressors still took part in the backward, or the reduce-scatter would hang).
    moved = {name for name in a if not torch.equal(a[name], start[name])}
    assert {n for n in a if "nsa_cmp" in n or "nsa_gate" in n} <= moved


def test_fsdp_with_the_alignment_term_trains_like_one_process(align_runs):
    one = json.loads((align_runs / "one_align" / "losses.json").read_text())
    sharded = json.loads((align_runs / "fsdp_align" / "losses.json").read_text())
    plain = json.loads((align_runs / "one" / "losses.json").read_text())
    assert sharded["lm_losses"] == pytest.approx(one["lm_losses"], rel=1e-5)
    assert sharded["losses"] == pytest.approx(one["losses"], rel=1e-5)
    # The objective is the language-model loss plus the term (a KL divergence, > 0 on these weights), except
    # at step 1, whose documents are all shorter than the first position with a block to choose
    # ((1 + 2) x 16 = 48); before the first step the language-model loss is the plain run's.
    assert one["lm_losses"][0] == pytest.approx(plain["losses"][0], rel=1e-6)
    terms = [a - b for a, b in zip(sharded["losses"], sharded["lm_losses"])]
    assert terms[1] == pytest.approx(0, abs=1e-6) and all(t > 1e-3 for i, t in enumerate(terms) if i != 1), terms
    a = AutoModelForCausalLM.from_pretrained(align_runs / "one_align").state_dict()
    b = AutoModelForCausalLM.from_pretrained(align_runs / "fsdp_align").state_dict()
    without = AutoModelForCausalLM.from_pretrained(align_runs / "one").state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    # The term's gradient reached the key compressors (they trained differently than without it).
    compressors = [n for n in a if "nsa_cmp_k" in n]
    assert compressors and all((a[n] - without[n]).abs().max() > 1e-4 for n in compressors)


def test_fsdp_single_process_trains_and_saves_like_one_process(fsdp_runs):
    assert_trained_like_one_process(fsdp_runs, "fsdp1", 1)


def test_fsdp_saved_model_is_an_ordinary_checkpoint(fsdp_runs, tmp_path):
    one, fsdp = fsdp_runs / "one", fsdp_runs / "fsdp"
    # FSDP2 swaps in a generated class defined in torch; the save must not bundle torch's sources or
    # point auto_map at them.
    assert sorted(p.name for p in fsdp.iterdir()) == sorted(p.name for p in one.iterdir())
    config = json.loads((fsdp / "config.json").read_text())
    assert config["auto_map"] == json.loads((one / "config.json").read_text())["auto_map"]
    assert config["architectures"] == ["NSALlamaForCausalLM"]
    # Bundled for the Hub (what export_for_hub does after saving), it loads where nsa_hf is not installed.
    hub = tmp_path / "hub"
    shutil.copytree(fsdp, hub)
    bundle_remote_code(hub)
    assert_loads_as_remote_code(hub, AutoModelForCausalLM.from_pretrained(fsdp).eval(), tmp_path, length=70)


def test_save_pretrained_names_the_wrapped_class():
    from nsa_hf.modeling_nsa import class_before_fsdp as _class_before_fsdp
    from nsa_hf.modeling_nsa_llama import NSALlamaForCausalLM

    class FSDPModule:  # stands in for torch.distributed.fsdp.FSDPModule
        pass

    generated = type("FSDPNSALlamaForCausalLM", (FSDPModule, NSALlamaForCausalLM), {})
    assert _class_before_fsdp(generated) is NSALlamaForCausalLM
    assert _class_before_fsdp(NSALlamaForCausalLM) is NSALlamaForCausalLM
    user_subclass = type("FSDPLike", (NSALlamaForCausalLM,), {})  # a prefix alone is not FSDP's class
    assert _class_before_fsdp(user_subclass) is user_subclass
