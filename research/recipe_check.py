"""The conversion recipe measured through the product path: ``nsa-hf convert``, then ``examples/train.py``
(with and without the selection-alignment term) and the same script training the dense model, each result
loaded back with ``from_pretrained`` and scored on the quality experiment's held-out loss and span probe.

``research/quality.py`` measured the recipe through its own training loops (research/RUNS.md, runs 10-12:
an answer loss plus the alignment term at the answer positions). A user has the CLI, the training script and
text files; this harness does what that user would do, on the quality experiment's setting:

1. **Dense base.** ``quality.py``'s data (stdlib text, its byte-level BPE tokenizer), its copy warm-up and its
   dense pretraining (needle-mix 0.5) give the small dense Llama, saved as a checkpoint folder (``--base DIR``
   loads one instead: a folder this harness wrote, ``OUT/dense``).
2. **Convert** it with ``python -m nsa_hf.cli convert`` (the ``nsa-hf convert`` console script's module).
3. **Data as files.** ``OUT/data/train.jsonl`` (a ``text`` column): ordinary training text and, a fraction
   ``--needle-frac`` of the documents, needle documents in the span probe's format (random passages planted in
   training text at uniform depths, the target passage repeated at the end), so that the next-token loss on
   them teaches retrieval beyond the window. The passages are drawn from the *text-safe* tokens (a space and
   letters, one token each, so that the text tokenizes back to exactly the planted ids; a document whose target
   passage or ending would tokenize differently is drawn again).
4. **Train** with ``examples/train.py`` (subprocesses, the same data, steps, batch and seed): the recipe
   (``--nsa-only-steps N --align-weight W --align-rows R --align-in all``), the same without the term, and the
   dense checkpoint with ``--attn-implementation sdpa`` (dense continued training, no NSA-only phase).
5. **Evaluate** every final folder (``from_pretrained``): held-out loss (``quality.held_out_loss``) and exact
   match per depth on the quality experiment's span probe (``quality.needle_accuracy``: passages of random
   tokens from the whole vocabulary, as in runs 10-12) and on the same probe with text-safe tokens (what the
   training documents contain).
6. **Step time** of each run per phase from the Trainer's log history (``tokens_per_second`` of train.py's
   throughput log, saved in each phase's last ``trainer_state.json``; the first logging interval, which
   compiles the kernels, left out); the term's overhead is the recipe's step time over the run without it.

Prints a markdown table last and writes ``results.json``, ``results.md`` (the table, the verdict on the three
targets: >= 95 % at every depth, held-out loss within 1 % of dense, overhead <= 10 %; the commands), the
training logs and every model under ``--out``. With the defaults (the setting of RUNS.md's runs 10-12; 1000
steps of 8 x 2048 tokens per train.py run), estimated from those runs' step times, not yet measured: about
11 minutes on one H200, more than a device call's 10, hence ``--start-before`` (stop before starting a
training run past that time, exit status 3; the same command again continues from what is saved under
``--out``), or about 8 minutes on two GPUs with ``--gpus 2`` (the recipe and the run without the term side by
side, one GPU each)::

    python -m research.recipe_check --out runs/recipe --gpus 2 --extra-code $EX
    python -m research.recipe_check --out runs/recipe --start-before 240 --extra-code $EX   # twice on one GPU

(``$EX``: the torch, numpy and triton source folders, as in RUNS.md.) Training is bf16 (``train.py --bf16``:
bf16 weights and AdamW states), where quality.py keeps float32 master weights (``--fp32``: float32 throughout).

``--tiny``: a CPU smoke run of the whole pipeline (tiny model, a few steps, about 30 s on one core).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import quality

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "examples" / "train.py"
RUNS = ("recipe", "dense", "no_align")  # the short dense run second: a call cut short keeps recipe vs dense
RUN_LABELS = {"dense_base": "dense base (pretrained)", "converted": "NSA converted (untrained)",
              "recipe": "NSA recipe (alignment term)", "no_align": "NSA, same run without the term",
              "dense": "dense continued (sdpa)"}
FULL = dict(steps=1000, nsa_only_steps=100, batch_size=8, lr=5e-4, logging_steps=10, needle_eval=256,
            induction_curriculum="0:256:1000,0:2048:500", pretrain_steps=1500)
TINY = dict(steps=6, nsa_only_steps=2, batch_size=2, lr=2e-3, logging_steps=1, needle_eval=4,
            induction_curriculum="0:64:3", pretrain_steps=10)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m research.recipe_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/recipe", help="output directory (results.md, results.json, logs, models)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, a few steps, short context")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", default=None, metavar="DIR",
                    help="dense base checkpoint to start from (a folder this harness wrote: OUT/dense); default: "
                         "pretrain one with research/quality.py's functions")
    ap.add_argument("--start-before", type=float, default=None, metavar="SECONDS",
                    help="start a training run only this many seconds into the script; past that, stop (exit status "
                         "3) with what is done saved under --out: the same command again reuses the dense base, the "
                         "converted model, the data and every finished run, and continues (for device calls with a "
                         "time limit). Default: no limit")
    ap.add_argument("--gpus", type=int, default=1,
                    help="train.py runs at a time, each on its own GPU (default 1: one after the other); the runs "
                         "compared for step time then run on different GPUs of one host")
    ap.add_argument("--quality-args", default="", metavar="'FLAGS'",
                    help="further research/quality.py flags for the model, data, NSA sizes and probe, as one string "
                         "(e.g. '--seq-len 4096 --window 256'); they come last, so they win")
    ap.add_argument("--extra-code", nargs="*", default=[],
                    help="directories whose .py files are added to the training text (quality.py's flag)")
    b = ap.add_argument_group("dense base (research/quality.py's pretraining)")
    b.add_argument("--pretrain-steps", type=int, default=None, help=f"default {FULL['pretrain_steps']}")
    b.add_argument("--induction-curriculum", default=None, metavar="VOCAB:LEN:STEPS,...",
                   help=f"the copy warm-up before pretraining (default {FULL['induction_curriculum']}; 'none': off)")
    t = ap.add_argument_group("continued training (examples/train.py)")
    t.add_argument("--steps", type=int, default=None, help=f"--max-steps of every run (default {FULL['steps']})")
    t.add_argument("--nsa-only-steps", type=int, default=None,
                   help=f"the NSA runs' --nsa-only-steps (default {FULL['nsa_only_steps']}; the dense run has none)")
    t.add_argument("--batch-size", type=int, default=None,
                   help=f"documents of <= --seq-len tokens per step (default {FULL['batch_size']})")
    t.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (default {FULL['lr']}; NSA-only phase x10)")
    t.add_argument("--logging-steps", type=int, default=None, help=f"default {FULL['logging_steps']}")
    t.add_argument("--nsa-lr", type=float, default=None,
                   help="learning rate of the NSA runs' NSA-only phase (train.py's --nsa-lr; default --lr x 10)")
    t.add_argument("--needle-frac", type=float, default=0.5,
                   help="fraction of the training documents that are needle documents (default 0.5)")
    t.add_argument("--align-weight", type=float, default=1.0, help="the recipe's --align-weight (default 1.0)")
    t.add_argument("--align-rows", type=int, default=64, help="the recipe's --align-rows (default 64)")
    t.add_argument("--align-in", choices=("warmup", "all"), default="all", help="the recipe's --align-in (default all)")
    t.add_argument("--fp32", action="store_true",
                   help="train and evaluate in float32 on CUDA too (train.py without --bf16; default: --bf16, i.e. "
                        "bf16 weights and optimizer states)")
    t.add_argument("--gradient-checkpointing", action="store_true", help="pass --gradient-checkpointing to train.py")
    e = ap.add_argument_group("evaluation")
    e.add_argument("--needle-eval", type=int, default=None,
                   help=f"held-out probes per depth (default {FULL['needle_eval']})")
    args = ap.parse_args(argv)
    for key, value in (TINY if args.tiny else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("steps", "batch_size", "logging_steps", "needle_eval", "align_rows", "pretrain_steps", "gpus"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if not 0 <= args.nsa_only_steps < args.steps:
        ap.error(f"--nsa-only-steps {args.nsa_only_steps}: must be >= 0 and below --steps {args.steps}")
    if args.align_in == "warmup" and args.nsa_only_steps == 0:
        ap.error("--align-in warmup: needs --nsa-only-steps N > 0 (the phase that has the term)")
    if args.start_before is not None and not args.start_before >= 0:
        ap.error(f"--start-before {args.start_before}: must be a number of seconds >= 0")
    if not 0.0 <= args.needle_frac <= 1.0:
        ap.error(f"--needle-frac {args.needle_frac}: must be in [0, 1]")
    if not (args.align_weight > 0 and math.isfinite(args.align_weight)):
        ap.error(f"--align-weight {args.align_weight}: must be a finite number > 0 (the run without the term is the "
                 "other run)")
    if args.base is not None and not (Path(args.base) / "config.json").is_file():
        ap.error(f"--base {args.base}: no config.json there; give a checkpoint folder (OUT/dense of an earlier run)")
    return args


def quality_args(args) -> argparse.Namespace:
    """``research/quality.py``'s settings for this run (its defaults, or its ``--tiny`` ones): the model, data,
    NSA sizes, the span probe and the dense pretraining of the quality experiment."""
    argv = ["--probe", "span", "--seed", str(args.seed), "--pretrain-steps", str(args.pretrain_steps),
            "--needle-eval", str(args.needle_eval)]  # --batch-size: quality.py's (pretraining, evaluation)
    if args.tiny:
        argv += ["--tiny", "--induction-span", "8", "--induction-batch-size", "2", "--needle-batch-size", "4"]
    else:
        argv += ["--needle-batch-size", "32"]
    if args.induction_curriculum and args.induction_curriculum != "none":
        argv += ["--induction-curriculum", args.induction_curriculum]
    if args.extra_code:
        argv += ["--extra-code", *args.extra_code]
    if args.device:
        argv += ["--device", args.device]
    return quality.parse_args(argv + shlex.split(args.quality_args))


def log(msg: str) -> None:
    print(f"[recipe_check] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Dense base and conversion


def tokenized_data(qargs, tokenizer):
    """Training blocks ``(N, L)`` and held-out blocks as ``quality.load_data`` makes them, with a given tokenizer
    (the one saved with a ``--base`` checkpoint)."""
    from nsa_hf.sample_data import stdlib_documents, token_blocks

    train_docs, eval_docs = stdlib_documents(min_chars=2000, max_chars=qargs.max_chars)
    extra = quality._extra_documents(qargs.extra_code) if qargs.extra_code else []
    ids = tokenizer(train_docs + extra, add_special_tokens=False)["input_ids"]
    stream = torch.tensor([t for doc in ids for t in doc + [tokenizer.eos_token_id]], dtype=torch.long)
    n = len(stream) // qargs.seq_len
    if n < 2:
        raise RuntimeError(f"only {len(stream)} training tokens: fewer than 2 blocks of {qargs.seq_len}")
    return stream[: n * qargs.seq_len].view(n, qargs.seq_len), token_blocks(tokenizer, eval_docs, qargs.seq_len,
                                                                           max_blocks=qargs.eval_blocks)


def cached_blocks(path: Path, qargs, tokenizer):
    """Training and held-out blocks from ``path`` when an earlier call of the same command saved them there (same
    context length), else tokenized now (:func:`tokenized_data`) and saved there."""
    if path.is_file():
        saved = torch.load(path)
        if saved["seq_len"] == qargs.seq_len:
            log(f"reusing the tokenized data in {path}")
            return saved["train"], saved["eval"]
    train_blocks, eval_blocks = tokenized_data(qargs, tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"seq_len": qargs.seq_len, "train": train_blocks, "eval": eval_blocks}, path)
    return train_blocks, eval_blocks


def pretrain_dense(qargs, tokenizer, train_blocks, probe, device, dtype):
    """The quality experiment's dense model: copy warm-up (``--induction-curriculum``), then pretraining on
    stdlib text with the span probe planted in half the sequences; returns the float32 master model."""
    dense = quality.build_dense(qargs, len(tokenizer), tokenizer.eos_token_id).to(device)
    if qargs.induction_stages:
        steps = sum(st["steps"] for st in qargs.induction_stages)
        log(f"copy warm-up: {steps} steps, stages {qargs.induction_stages}")
        run = quality.Run(dense, dtype, qargs.induction_lr, steps, qargs)
        quality.train_induction(run, quality.ordinary_ids(tokenizer), qargs, device)
        dense = run.master
    log(f"pretraining dense for {qargs.pretrain_steps} steps of {qargs.batch_size} x {qargs.seq_len} tokens")
    run = quality.Run(dense, dtype, qargs.lr, qargs.pretrain_steps, qargs)
    stream = quality.BatchStream(train_blocks, qargs.batch_size, qargs.seed)
    quality.train_lm(run, stream, 0, device, "dense pretrain", probe, qargs.needle_mix, qargs.seed)
    return run.master


def convert_command(dense_dir: Path, nsa_dir: Path, qargs) -> list[str]:
    """``nsa-hf convert`` (as ``python -m nsa_hf.cli convert``) with the quality experiment's NSA sizes."""
    cmd = [sys.executable, "-m", "nsa_hf.cli", "convert", str(dense_dir), str(nsa_dir), "--no-eval", "--quiet",
           "--overwrite", "--dtype", "float32"]
    for key, value in quality.nsa_settings(qargs).items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    return cmd


def launch_logged(cmd: list[str], log_path: Path, what: str, env: dict | None = None):
    """Start ``cmd`` from the repository root with its output in ``log_path``; ``(process, start time, log file)``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log(f"{what}: {' '.join(shlex.quote(c) for c in cmd)}")
    f = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env or dict(os.environ)), \
        time.perf_counter(), f


def wait_logged(started, log_path: Path, what: str) -> float:
    """Wait for a process of :func:`launch_logged`; the seconds it took. A failure raises ``RuntimeError`` with
    the end of the log."""
    proc, start, f = started
    returncode = proc.wait()
    f.close()
    seconds = time.perf_counter() - start
    if returncode != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{what} failed (exit status {returncode}); the end of {log_path}:\n{tail}")
    log(f"{what}: done in {seconds:.0f} s (log {log_path})")
    return seconds


def run_logged(cmd: list[str], log_path: Path, what: str) -> float:
    """Run ``cmd`` from the repository root with its output in ``log_path``; the seconds it took (a failure raises
    ``RuntimeError`` with the end of the log)."""
    return wait_logged(launch_logged(cmd, log_path, what), log_path, what)


# ---------------------------------------------------------------------------------------------
# Training data as files


def text_safe_ids(tokenizer) -> torch.Tensor:
    """The token ids that are a space followed by ASCII letters (byte-level ``Ġword``) and that the tokenizer
    gives back alone for their own text: a run of them, as text, tokenizes back to the same ids (the byte-level
    pre-tokenizer splits before each space-letter word)."""
    ids = []
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if token and token[0] == "\u0120" and token[1:].isascii() and token[1:].isalpha():
            if tokenizer(tokenizer.decode([i]), add_special_tokens=False)["input_ids"] == [i]:
                ids.append(i)
    return torch.tensor(ids, dtype=torch.long)


def contains(ids: torch.Tensor, piece: torch.Tensor) -> bool:
    """Whether ``piece`` occurs in ``ids`` as a contiguous run."""
    if len(ids) < len(piece):
        return False
    return bool((ids.unfold(0, len(piece), 1) == piece).all(-1).any())


def needle_document(probe, tokenizer, filler: torch.Tensor, depth: float, gen: torch.Generator,
                    tries: int = 20) -> str:
    """One needle document as text: ``probe.batch``'s layout (its passages drawn from ``probe.vocab_ids``) in
    ``filler``, decoded. Drawn again (other passages, same depth) until the text tokenizes back to at most
    ``probe.seq_len`` tokens that end with the target passage (cue + answer) and hold it once more before;
    ``RuntimeError`` after ``tries`` draws."""
    for _ in range(tries):
        ids, answers = probe.batch(filler[None], [depth], gen)
        text = tokenizer.decode(ids[0].tolist())
        back = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        target = ids[0, -probe.span_len:]
        if len(back) <= probe.seq_len and torch.equal(back[-probe.span_len:], target) \
                and contains(back[:-probe.span_len], target):
            return text
    raise RuntimeError(f"no needle document at depth {depth:.3f} tokenized back to its layout in {tries} draws")


def write_training_data(path: Path, probe, tokenizer, train_blocks: torch.Tensor, count: int, needle_frac: float,
                        seed: int) -> dict:
    """``count`` documents as JSON lines (``{"text": ...}``): ``round(needle_frac * count)`` needle documents
    (uniform depths, fillers from the training blocks) spread evenly among ordinary training blocks decoded to
    text. Returns what was written (also in ``path`` + ``.info.json``; a file written before with the same
    settings is kept)."""
    info_path = path.with_name(path.name + ".info.json")
    settings = {"count": count, "needle_frac": needle_frac, "seed": seed, "seq_len": probe.seq_len}
    if path.is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("settings") == settings:
            log(f"reusing the training data in {path}")
            return info
    gen = torch.Generator().manual_seed(seed * 7919 + 31)
    needles = int(round(needle_frac * count))
    order = torch.randperm(len(train_blocks), generator=gen)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = {"documents": count, "needle_documents": needles, "text_documents": count - needles}
    with open(path, "w") as f:
        for i in range(count):
            block = train_blocks[order[i % len(order)]]
            is_needle = needles and (i * needles) // count != ((i + 1) * needles) // count
            if is_needle:
                text = needle_document(probe, tokenizer, block, float(torch.rand((), generator=gen)), gen)
            else:
                text = tokenizer.decode(block.tolist())
            f.write(json.dumps({"text": text}) + "\n")
    written["bytes"] = path.stat().st_size
    written["settings"] = settings
    info_path.write_text(json.dumps(written, indent=1))
    return written


# ---------------------------------------------------------------------------------------------
# Training runs


def train_command(run: str, model_dir: Path, data: Path, out_dir: Path, args, qargs, cuda: bool) -> list[str]:
    """``examples/train.py`` for ``run``: ``recipe`` (alignment term), ``no_align`` (the same without it) or
    ``dense`` (the dense checkpoint with ``--attn-implementation sdpa``, all weights from the first step)."""
    if run not in RUNS:
        raise ValueError(f"run={run!r}: expected one of {RUNS}")
    cmd = [sys.executable, str(TRAIN_SCRIPT), "--model", str(model_dir), "--data", str(data),
           "--output-dir", str(out_dir), "--seq-len", str(qargs.seq_len), "--batch-size", str(args.batch_size),
           "--max-steps", str(args.steps), "--lr", f"{args.lr:g}", "--logging-steps", str(args.logging_steps),
           "--save-steps", str(args.steps), "--seed", str(args.seed), "--log-file", str(out_dir / "losses.json")]
    if cuda and not args.fp32:
        cmd.append("--bf16")
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    if run == "dense":
        return cmd + ["--attn-implementation", "sdpa"]
    if args.nsa_only_steps:
        cmd += ["--nsa-only-steps", str(args.nsa_only_steps)]
    if args.nsa_lr is not None:
        cmd += ["--nsa-lr", f"{args.nsa_lr:g}"]
    if run == "recipe":
        cmd += ["--align-weight", f"{args.align_weight:g}", "--align-rows", str(args.align_rows),
                "--align-in", args.align_in]
    return cmd


def phase_step_times(out_dir: Path) -> dict:
    """Per phase of a train.py run (``phase1-nsa-only``, ``phase2-all``): seconds per optimizer step from the
    log history in its last checkpoint's ``trainer_state.json`` (``num_input_tokens_seen`` and train.py's
    ``tokens_per_second`` per logging interval), the first interval left out (kernel compilation) unless it
    is the only one."""
    times = {}
    for phase_dir in sorted(out_dir.glob("phase*")):
        states = sorted(phase_dir.glob("checkpoint-*/trainer_state.json"),
                        key=lambda p: int(p.parent.name.split("-")[1]))
        if not states:
            continue
        logs = [h for h in json.loads(states[-1].read_text())["log_history"]
                if "tokens_per_second" in h and h.get("tokens_per_second")]
        intervals, prev_step, prev_tokens = [], 0, 0
        for h in logs:
            tokens = h.get("num_input_tokens_seen")
            if tokens is None:
                raise KeyError(f"{states[-1]}: a log without num_input_tokens_seen (train.py sets "
                               "include_num_input_tokens_seen)")
            intervals.append((h["step"] - prev_step, (tokens - prev_tokens) / h["tokens_per_second"]))
            prev_step, prev_tokens = h["step"], tokens
        kept = intervals[1:] or intervals
        steps, seconds = sum(s for s, _ in kept), sum(t for _, t in kept)
        times[phase_dir.name] = {"seconds_per_step": seconds / steps if steps else None, "steps_timed": steps,
                                 "intervals": len(intervals)}
    return times


def overall_step_time(times: dict) -> float | None:
    """Seconds per step over every timed step of a run (all phases)."""
    steps = sum(t["steps_timed"] for t in times.values() if t["seconds_per_step"] is not None)
    seconds = sum(t["seconds_per_step"] * t["steps_timed"] for t in times.values() if t["seconds_per_step"] is not None)
    return seconds / steps if steps else None


# ---------------------------------------------------------------------------------------------
# Evaluation


def load_for_eval(folder: Path, attn: str, device, dtype):
    """A saved model, loaded the way a user would (``from_pretrained``), in evaluation mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn).to(device)
    model.config.use_cache = False
    return model.eval()


def evaluate(model, qargs, probes: dict, eval_blocks, device) -> dict:
    """Held-out loss (``quality.held_out_loss``) and exact match per depth on each probe of ``probes``
    (``quality.needle_accuracy`` on held-out fillers)."""
    result = {"loss": quality.held_out_loss(model, eval_blocks, qargs.batch_size, device)}
    for name, probe in probes.items():
        acc = quality.needle_accuracy(model, probe, eval_blocks, qargs.depths, qargs.needle_eval,
                                      qargs.needle_batch_size, qargs.seed, device)
        result[name] = {depth: a["exact"] for depth, a in acc.items()}
    return result


# ---------------------------------------------------------------------------------------------
# Report


def fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def table(results: dict) -> str:
    """The markdown table: every model's exact match per depth (the quality probe), its mean, the mean on the
    text-token probe, held-out loss and its ratio to dense continued training, step time and the term's
    overhead."""
    depths = results["depths"]
    evals, times = results["eval"], results["step_time"]
    dense_loss = evals.get("dense", {}).get("loss", {}).get("all")
    base_time = times.get("no_align")
    head = (["model"] + [f"EM @ {d}" for d in depths]
            + ["EM mean", "EM mean, text tokens", "held-out loss", "vs dense", "s / step", "term overhead"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, ev in evals.items():
        em = [ev["quality_probe"][d] for d in depths]
        loss = ev["loss"]["all"]
        step = times.get(name)
        ratio = loss / dense_loss if dense_loss else None
        overhead = step / base_time - 1 if name == "recipe" and step and base_time else None
        lines.append("| " + " | ".join([RUN_LABELS.get(name, name)] + [fmt(x) for x in em] + [
            fmt(sum(em) / len(em)), fmt(sum(ev["text_probe"].values()) / len(depths)), fmt(loss, ".4f"),
            fmt(ratio, ".4f"), fmt(step, ".3f"), "-" if overhead is None else f"{100 * overhead:+.1f} %"]) + " |")
    return "\n".join(lines) + "\n"


def verdict(results: dict) -> dict:
    """The requirement's three checks for the recipe run (None where a number is missing)."""
    ev, times = results["eval"], results["step_time"]
    recipe, dense = ev.get("recipe"), ev.get("dense")
    em = recipe["quality_probe"].values() if recipe else []
    overhead = (times["recipe"] / times["no_align"] - 1) if times.get("recipe") and times.get("no_align") else None
    return {"needle_ge_95pct_every_depth": all(x >= 0.95 for x in em) if recipe else None,
            "loss_within_1pct_of_dense": (recipe["loss"]["all"] / dense["loss"]["all"] - 1 <= 0.01
                                          if recipe and dense else None),
            "term_overhead": overhead, "overhead_le_10pct": overhead <= 0.10 if overhead is not None else None}


# ---------------------------------------------------------------------------------------------


def obtain_dense_base(args, qargs, out: Path, device, dtype, results: dict):
    """The dense base folder, its tokenizer and the training and held-out blocks: ``--base``, else ``OUT/dense``
    when an earlier call of the same command saved it, else pretrained now (:func:`pretrain_dense`) and saved
    there (written to ``OUT/dense.tmp`` first, so a folder cut short is never taken for a finished one)."""
    from transformers import AutoTokenizer

    dense_dir = Path(args.base).resolve() if args.base else out / "dense"
    blocks = out / "data" / "blocks.pt"
    if (dense_dir / "config.json").is_file():
        log(f"dense base: {dense_dir}")
        tokenizer = AutoTokenizer.from_pretrained(dense_dir)
        train_blocks, eval_blocks = cached_blocks(blocks, qargs, tokenizer)
        return dense_dir, tokenizer, train_blocks, eval_blocks
    tokenizer, train_blocks, eval_blocks, results["data"] = quality.load_data(qargs)
    blocks.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"seq_len": qargs.seq_len, "train": train_blocks, "eval": eval_blocks}, blocks)
    start = time.perf_counter()
    dense = pretrain_dense(qargs, tokenizer, train_blocks, quality.make_probe(qargs, tokenizer), device, dtype)
    tmp = out / "dense.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    dense.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, dense_dir)
    results["seconds"]["dense_base"] = time.perf_counter() - start
    log(f"saved the dense base to {dense_dir} ({results['seconds']['dense_base']:.0f} s)")
    return dense_dir, tokenizer, train_blocks, eval_blocks


def convert_base(dense_dir: Path, out: Path, qargs, results: dict) -> Path:
    """``OUT/nsa_converted``: converted now with ``nsa-hf convert``, or kept from an earlier call."""
    nsa_dir = out / "nsa_converted"
    cmd = convert_command(dense_dir, out / "nsa_converted.tmp", qargs)
    results["commands"]["convert"] = " ".join(shlex.quote(c) for c in cmd).replace("nsa_converted.tmp", "nsa_converted")
    if (nsa_dir / "config.json").is_file():
        log(f"converted model: {nsa_dir} (from an earlier call)")
        return nsa_dir
    results["seconds"]["convert"] = run_logged(cmd, out / "logs" / "convert.log", "convert")
    os.replace(out / "nsa_converted.tmp", nsa_dir)
    return nsa_dir


def gpu_ids(count: int) -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` entries of the first ``count`` GPUs this process may use."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(count)]
    if len(ids) < count or torch.cuda.device_count() < count:
        raise ValueError(f"--gpus {count}: only {min(len(ids), torch.cuda.device_count())} CUDA devices visible")
    return ids[:count]


def train_runs(commands: dict, out: Path, results: dict, gpus: int, may_start) -> list[str]:
    """Run ``examples/train.py`` for each ``run: command`` of ``commands`` in order, at most ``gpus`` at a time
    (``gpus > 1``: each on its own GPU through ``CUDA_VISIBLE_DEVICES``), skipping the runs an earlier call
    finished (``runs/RUN/done.json``; a run cut short before starts again from scratch). A run starts only while
    ``may_start()`` holds; the runs that did not start are returned."""
    pending = []
    for run, cmd in commands.items():
        results["commands"][run] = " ".join(shlex.quote(c) for c in cmd)
        done = out / "runs" / run / "done.json"
        if done.is_file() and (out / "runs" / run / "final" / "config.json").is_file():
            results["seconds"][run] = json.loads(done.read_text())["seconds"]
            log(f"train.py {run}: finished in an earlier call ({done.parent})")
        else:
            pending.append(run)
    free = gpu_ids(gpus) if gpus > 1 else [None]
    active = {}
    while pending or active:
        while pending and free and may_start():
            run, gpu = pending.pop(0), free.pop(0)
            shutil.rmtree(out / "runs" / run, ignore_errors=True)
            env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}))
            what = f"train.py {run}" + (f" (GPU {gpu})" if gpu is not None else "")
            active[run] = (launch_logged(commands[run], out / "logs" / f"train_{run}.log", what, env), gpu, what)
        if not active:
            break
        finished = next((r for r, (started, _, _) in active.items() if started[0].poll() is not None), None)
        if finished is None:
            time.sleep(0.5)
            continue
        started, gpu, what = active.pop(finished)
        seconds = wait_logged(started, out / "logs" / f"train_{finished}.log", what)
        (out / "runs" / finished / "done.json").write_text(json.dumps(
            {"seconds": seconds, "gpu": gpu, "command": results["commands"][finished]}))
        results["seconds"][finished] = seconds
        free.append(gpu)
    return pending


def main(argv=None) -> dict:
    """The whole check; returns the results (``results["incomplete"]`` when ``--start-before`` stopped it)."""
    args = parse_args(argv)
    qargs = quality_args(args)
    import nsa_hf  # noqa: F401  (registers NSA-Llama and attn_implementation="nsa")
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda and not args.fp32 else torch.float32
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed)
    results = {"args": vars(args), "quality_args": {k: v for k, v in vars(qargs).items()}, "device": str(device),
               "depths": [f"{d:g}" for d in qargs.depths], "commands": {}, "seconds": {}}
    if cuda:
        results["gpu"] = torch.cuda.get_device_name(device)

    # 1. dense base, 2. conversion
    dense_dir, tokenizer, train_blocks, eval_blocks = obtain_dense_base(args, qargs, out, device, dtype, results)
    log(f"data: {len(train_blocks)} training blocks, {len(eval_blocks)} held-out blocks of {qargs.seq_len} tokens")
    nsa_dir = convert_base(dense_dir, out, qargs, results)

    # 3. data files
    probe = quality.make_probe(qargs, tokenizer)
    text_probe = quality.make_probe(qargs, tokenizer)
    text_probe.vocab_ids = text_safe_ids(tokenizer)
    results["text_safe_tokens"] = len(text_probe.vocab_ids)
    if len(text_probe.vocab_ids) < 2 * qargs.span_len:
        raise RuntimeError(f"only {len(text_probe.vocab_ids)} text-safe tokens in a vocabulary of {len(tokenizer)}: "
                           f"too few for passages of {qargs.span_len} tokens")
    data = out / "data" / "train.jsonl"
    results["training_data"] = write_training_data(data, text_probe, tokenizer, train_blocks,
                                                   args.steps * args.batch_size, args.needle_frac, args.seed)
    log(f"training data: {results['training_data']} in {data}")

    # 4. training runs
    # one GPU: the short dense run second, so a call cut short keeps recipe vs dense; several: recipe and the run
    # without the term side by side (same start, same load), dense after
    order = ("recipe", "no_align", "dense") if cuda and args.gpus > 1 else RUNS
    commands = {run: train_command(run, dense_dir if run == "dense" else nsa_dir, data, out / "runs" / run, args,
                                   qargs, cuda) for run in order}
    deadline = math.inf if args.start_before is None else args.start_before
    not_started = train_runs(commands, out, results, args.gpus if cuda else 1,
                             lambda: time.perf_counter() - t0 <= deadline)
    if not_started:
        results["incomplete"] = (f"train.py {', '.join(not_started)} not started (--start-before "
                                 f"{args.start_before:g} s)")
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        log(f"{results['incomplete']}: run the same command again to continue")
        return results
    finals = {run: out / "runs" / run / "final" for run in RUNS}
    try:
        results["phase_step_time"] = {run: phase_step_times(out / "runs" / run) for run in RUNS}
        results["step_time"] = {run: overall_step_time(t) for run, t in results["phase_step_time"].items()}
    except (KeyError, ValueError, OSError) as err:  # keep the evaluation of the trained models
        log(f"step times not read: {err!r}")
        results["phase_step_time"], results["step_time"] = {"error": repr(err)}, {}

    # 5. evaluation of every saved model
    probes = {"quality_probe": probe, "text_probe": text_probe}
    folders = {"dense_base": (dense_dir, "sdpa"), "converted": (nsa_dir, "nsa"), "recipe": (finals["recipe"], "nsa"),
               "no_align": (finals["no_align"], "nsa"), "dense": (finals["dense"], "sdpa")}
    results["eval"] = {}
    for name, (folder, attn) in folders.items():
        model = load_for_eval(folder, attn, device, dtype)
        results["eval"][name] = evaluate(model, qargs, probes, eval_blocks, device)
        del model
        log(f"{name}: held-out loss {results['eval'][name]['loss']['all']:.4f}, exact match by depth "
            f"{results['eval'][name]['quality_probe']} (text tokens {results['eval'][name]['text_probe']})")
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))

    # 6. report
    results["pass"] = verdict(results)
    results["seconds"]["total"] = time.perf_counter() - t0
    text = table(results)
    commands = "\n".join(f"    # {k}\n    {v}" for k, v in results["commands"].items())
    (out / "results.md").write_text(f"{text}\nverdict: {results['pass']}\n\ncommands:\n\n{commands}\n")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    log(f"verdict: {results['pass']}; done in {results['seconds']['total']:.0f} s; results in {out}")
    print(text, flush=True)
    return results


if __name__ == "__main__":
    sys.exit(3 if main().get("incomplete") else 0)
