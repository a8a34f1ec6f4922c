"""research/recipe_check.py end to end in its --tiny CPU mode (nsa-hf convert, three examples/train.py runs,
evaluation of the saved folders), and the pieces its numbers rest on: the training documents tokenize back to
the probe's layout, step times come out of the Trainer's log history as written, and train.py's dense mode
refuses the NSA-only flags."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from research import recipe_check

    out = tmp_path_factory.mktemp("recipe")
    argv = ["--tiny", "--out", str(out), "--device", "cpu"]
    first = recipe_check.main(argv + ["--start-before", "0"])  # a device call cut short: base, model, data only
    assert first["incomplete"].startswith("train.py recipe, dense, no_align not started")
    stamps = {p: p.stat().st_mtime_ns for p in (out / "dense" / "model.safetensors", out / "data" / "train.jsonl",
                                                  out / "nsa_converted" / "config.json")}
    results = recipe_check.main(argv)  # the same command again continues
    assert "incomplete" not in results
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # reused, not made again
    return out, results


def test_tiny_run_table_has_every_run_with_finite_numbers(tiny_run):
    from research.recipe_check import RUN_LABELS

    out, results = tiny_run
    table = (out / "results.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| ") and not line.startswith("| model")}
    assert set(rows) == set(RUN_LABELS.values())
    for label, cells in rows.items():
        em_and_loss = cells[:len(results["depths"]) + 4]  # EM per depth, mean, text-token mean, loss, ratio
        assert all(math.isfinite(float(c)) for c in em_and_loss), (label, cells)
        assert all(0.0 <= float(c) <= 1.0 for c in em_and_loss[:-2]), (label, cells)
    for run in ("recipe", "no_align", "dense"):
        step = float(rows[RUN_LABELS[run]][-2])
        assert math.isfinite(step) and step > 0
    assert rows[RUN_LABELS["recipe"]][-1].endswith("%")
    assert float(rows[RUN_LABELS["dense"]][-3]) == 1.0  # the ratio column is relative to dense continued
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["commands"]) == {"convert", "recipe", "no_align", "dense"}
    assert "--align-weight" in saved["commands"]["recipe"] and "--align-weight" not in saved["commands"]["no_align"]
    assert "--attn-implementation sdpa" in saved["commands"]["dense"]
    for run in ("recipe", "no_align"):  # both NSA runs have the NSA-only phase and the all-weights phase, timed
        assert set(saved["phase_step_time"][run]) == {"phase1-nsa-only", "phase2-all"}


def test_training_documents_tokenize_back_to_the_probe_layout(tiny_run):
    from transformers import AutoTokenizer

    from research import quality, recipe_check

    out, results = tiny_run
    tokenizer = AutoTokenizer.from_pretrained(out / "dense")
    safe = recipe_check.text_safe_ids(tokenizer)
    assert len(safe) == results["text_safe_tokens"] > 0
    g = torch.Generator().manual_seed(3)
    run = safe[torch.randint(0, len(safe), (200,), generator=g)]
    assert tokenizer(tokenizer.decode(run.tolist()), add_special_tokens=False)["input_ids"] == run.tolist()

    qargs = recipe_check.quality_args(recipe_check.parse_args(["--tiny"]))
    probe = quality.make_probe(qargs, tokenizer)
    probe.vocab_ids = safe
    docs = [json.loads(line)["text"] for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert len(docs) == results["training_data"]["documents"]
    with_needle = 0
    for text in docs:
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
        tail = ids[-probe.span_len:]
        with_needle += bool(len(ids) <= qargs.seq_len and set(tail.tolist()) <= set(safe.tolist())
                            and recipe_check.contains(ids[:-probe.span_len], tail))
    assert with_needle == results["training_data"]["needle_documents"]


def test_phase_step_times_read_the_trainer_log_history(tmp_path):
    from research.recipe_check import overall_step_time, phase_step_times

    history = [{"step": 10, "num_input_tokens_seen": 1000, "tokens_per_second": 100.0, "loss": 1.0},  # 10 s: left out
               {"step": 20, "num_input_tokens_seen": 3000, "tokens_per_second": 1000.0, "loss": 1.0},  # 2 s
               {"step": 30, "num_input_tokens_seen": 5000, "tokens_per_second": 500.0, "loss": 1.0},  # 4 s
               {"train_runtime": 20.0, "step": 30}]
    for n, hist in ((5, []), (30, history)):
        state = tmp_path / "phase2-all" / f"checkpoint-{n}" / "trainer_state.json"
        state.parent.mkdir(parents=True)
        state.write_text(json.dumps({"log_history": hist}))
    times = phase_step_times(tmp_path)
    assert times["phase2-all"]["seconds_per_step"] == pytest.approx(6.0 / 20)
    assert times["phase2-all"]["intervals"] == 3
    assert overall_step_time(times) == pytest.approx(0.3)


def test_train_script_dense_mode_refuses_nsa_flags(capsys):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import train
    finally:
        sys.path.remove(str(ROOT / "examples"))
    base = ["--model", "m", "--data", str(ROOT / "README.md"), "--output-dir", "o", "--attn-implementation", "sdpa"]
    assert train.parse_args(base).attn_implementation == "sdpa"
    assert train.parse_args(base[:-2]).attn_implementation == "nsa"
    for extra in (["--nsa-only-steps", "2"], ["--align-weight", "1"]):
        with pytest.raises(SystemExit) as err:
            train.parse_args(base + extra)
        assert err.value.code == 2
        assert "--attn-implementation sdpa" in capsys.readouterr().err


def test_dense_reference_keeps_packed_documents_apart():
    """The dense run (train.py --attn-implementation sdpa) packs documents into one row as the NSA runs do; the
    sdpa mask must keep them apart: transformers reads the restarting position ids, without a cache only
    (train.py sets ``use_cache=False``); the packed logits equal those of each document alone."""
    from transformers import DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    docs = [torch.randint(0, 64, (n,)).tolist() for n in (7, 12, 5)]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": d} for d in docs])
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([d])).logits[0] for d in docs])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_bad_flags_are_named():
    from research.recipe_check import parse_args

    for argv, name in ((["--steps", "0"], "--steps"), (["--nsa-only-steps", "9", "--steps", "9"], "--nsa-only-steps"),
                       (["--needle-frac", "1.5"], "--needle-frac"), (["--base", "/nonexistent"], "--base")):
        with pytest.raises(SystemExit):
            parse_args(argv)


def test_train_runs_share_out_the_gpus_and_skip_finished_runs(tmp_path, monkeypatch):
    from research import recipe_check

    monkeypatch.setattr(recipe_check, "gpu_ids", lambda count: ["4", "7"][:count])
    write = ("import os, sys, time; d = sys.argv[1]; os.makedirs(d + '/final'); time.sleep(float(sys.argv[2])); "
             "open(d + '/final/config.json', 'w').write(os.environ.get('CUDA_VISIBLE_DEVICES', ''))")
    commands = {run: [sys.executable, "-c", write, str(tmp_path / "runs" / run), sleep]
                for run, sleep in (("a", "1.5"), ("b", "0"), ("c", "0"))}
    results = {"commands": {}, "seconds": {}}
    assert recipe_check.train_runs(commands, tmp_path, results, 2, lambda: True) == []
    gpu = {run: (tmp_path / "runs" / run / "final" / "config.json").read_text() for run in commands}
    assert gpu["a"] == "4" and gpu["b"] == "7" and gpu["c"] == "7"  # c waits for the first free GPU: b's
    assert results["seconds"]["c"] < results["seconds"]["a"]
    stamp = (tmp_path / "runs" / "a" / "done.json").stat().st_mtime_ns
    results = {"commands": {}, "seconds": {}}
    assert recipe_check.train_runs(commands, tmp_path, results, 1, lambda: False) == []  # all finished before
    assert (tmp_path / "runs" / "a" / "done.json").stat().st_mtime_ns == stamp


def test_quality_settings_follow_the_quality_experiment():
    from research import quality
    from research.recipe_check import parse_args, quality_args

    full = quality_args(parse_args([]))
    reference = quality.parse_args(["--probe", "span", "--induction-curriculum", "0:256:1000,0:2048:500",
                                    "--pretrain-steps", "1500", "--needle-eval", "256", "--needle-batch-size", "32"])
    assert vars(full) == vars(reference)  # runs 10-12's model, data, NSA sizes, probe and pretraining
    assert (full.seq_len, full.window, full.slc_count, full.hidden_size, full.layers) == (2048, 128, 16, 512, 8)
    wins = quality_args(parse_args(["--tiny", "--quality-args", "--seq-len 256 --window 32"]))
    assert (wins.seq_len, wins.window) == (256, 32)
