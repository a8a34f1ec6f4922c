"""The end-to-end demo (examples/demo.py) with tiny settings: it completes, losses are finite, both
training phases lower the held-out loss, and it writes its checkpoints and results."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
from tests.hf.test_hub import assert_loads_without_nsa_hf

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"


def _load_demo():
    spec = importlib.util.spec_from_file_location("nsa_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_runs_end_to_end_with_tiny_settings(tmp_path):
    demo = _load_demo()
    out = tmp_path / "demo"
    results = demo.main([
        "--steps", "12", "--nsa-steps", "6", "--out", str(out), "--seq-len", "128", "--batch-size", "4",
        "--vocab-size", "512", "--hidden-size", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2",
        "--max-chars", "400000", "--eval-blocks", "4", "--gen-tokens", "8", "--lr", "5e-3", "--nsa-lr", "2e-3",
        "--cmp-block", "8", "--cmp-stride", "4", "--slc-block", "16", "--slc-count", "4", "--window", "16",
    ])
    loss = results["loss"]
    assert all(math.isfinite(v) for v in loss.values()), loss
    assert loss["dense_trained"] < loss["dense_init"] - 0.5
    assert loss["nsa_trained"] < loss["nsa_converted"]
    conv = results["conversion"]
    assert conv["sparse_at_eval_len"] and math.isfinite(conv["logit_max_abs_gap"])
    k = results["keys_per_query"]
    assert k["slc"] < k["dense"] and k["win"] < k["dense"]
    assert results["generation"]["new_tokens"] == 8
    assert results["dense_training"]["tokens_per_second"] > 0
    for sub in ("dense", "nsa-converted", "nsa-trained"):
        assert (out / sub / "config.json").is_file()
    assert json.loads((out / "results.json").read_text())["loss"] == pytest.approx(loss)
    # The trained folder (its card shows trust_remote_code loading) loads where nsa-hf is not installed.
    from transformers import AutoTokenizer

    assert_loads_without_nsa_hf(out / "nsa-trained", tmp_path, tokenizer=AutoTokenizer.from_pretrained(out / "nsa-trained"))


def test_demo_help_and_bad_flags(capsys):
    demo = _load_demo()
    with pytest.raises(SystemExit) as info:
        demo.parse_args(["--help"])
    assert info.value.code == 0
    assert "--steps" in capsys.readouterr().out
    assert not [a.option_strings for a in demo.build_parser()._actions if not a.help]  # every flag explained
    with pytest.raises(SystemExit):
        demo.parse_args(["--steps", "0"])
