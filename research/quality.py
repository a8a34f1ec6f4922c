"""Quality experiment: does a dense Llama converted to NSA and trained on keep the dense model's loss,
and can it retrieve what its sliding window cannot see?

Real text that ships with Python (the standard library's sources; held-out files for evaluation), a
byte-level BPE tokenizer trained on it (``nsa_hf.sample_data``), then:

0. Optionally (``--induction-curriculum`` or ``--induction-steps``), a **copy warm-up** of the dense
   model on synthetic sequences (random tokens in which spans repeat at random earlier offsets, loss on
   the repeated tokens): without it, the small models trained here never learn to copy, and every probe
   stays at chance for dense and NSA alike. At 2048 tokens the copy circuit does not form from scratch;
   ``--induction-curriculum 0:256:1000,0:2048:500`` (short sequences first) forms it (research/RUNS.md,
   run 4). A held-out **copy probe** (synthetic copy sequences, accuracy by copy distance) is scored for
   every model after every stage (``copy_probe`` in the results).
1. **Pretrain** a small dense ``LlamaForCausalLM`` (26.2M parameters by default) for
   ``--pretrain-steps`` steps.
2. **Continue** it two ways on the *same* batches (same order) for ``--continue-steps`` steps:
   (a) dense, (b) converted to NSA-Llama (``convert_llama_to_nsa``) and trained as NSA.
   Held-out loss of: dense pretrained, converted untrained NSA, dense continued, NSA continued; the
   relative gap NSA vs dense (target: within 1 %), also over the later half of the positions, where
   the sparsity bites most.
3. **Needle in a haystack**, one of two probes (``--probe``), both built from token ids (so no BPE merge
   can make the planted tokens differ from the answer), planted in held-out stdlib text, in a context
   of ``--seq-len`` tokens (>= 4x the window), the target at each of ``--depths``; everything planted
   is further from every scored position than the window reaches (``geometry`` in ``results.json``:
   the distance per depth, and whether it also lies beyond the stacked windows, layers x (window - 1)).
   Scoring is teacher-forced argmax over the answer positions (which equals greedy decoding's exact
   match): exact match (the whole answer right) and per-token accuracy.

   * ``span`` (default): **repeated random spans (induction copying)**, which needs no key/value
     binding, only copy (induction) heads. A passage of ``--span-len`` random token ids (uniform over the vocabulary, special
     tokens excluded) sits at the probe's depth, ``--span-distractors`` other random passages at random
     non-overlapping places; the context ends with the target passage again: its first
     ``--span-prefix`` tokens (the cue), then the rest, which is the answer (``span-len - span-prefix``
     tokens). Chance per token is about 1 / vocabulary size.
   * ``kv``: **multi-key recall**. ``--needle-pairs`` lines ``\n K = ddd\n`` (``K`` a capital-letter
     token, distinct per line; ``--needle-digits`` digit tokens), and the context ends with the
     questions ``\n K = `` for every planted key, each followed by its digits: the target key first
     (its line at the probe's depth), the others in random order, none asked twice; the target's
     digits are scored.

   Each model is fine-tuned for ``--needle-steps`` steps on freshly planted sequences of training text
   at uniform depths (loss on the answer tokens only: every answer digit of every question for ``kv``;
   ``--needle-loss lm``: next-token loss on every token of those sequences instead; ``both``: the sum;
   ``answer_capped``: the answer loss with each token's cross-entropy clamped at ``--answer-loss-cap``, so
   tokens the model cannot currently copy add no gradient; ``answer_align``: the answer loss plus
   ``--align-weight`` x the selection alignment loss of ``research/selection_align.py``, which moves the NSA
   layers' selection scores at the answer positions toward full attention's block mass, an experiment
   outside the NSA paper), then evaluated on
   ``--needle-eval`` held-out sequences per depth (span probe, NSA variants: also which blocks each layer
   selected at the answers, ``research/selection_probe.py``). ``--needle-val-every N`` scores validation
   probes (training-text fillers, other random passages) every N fine-tune steps, and
   ``--needle-keep-best`` ends each fine-tune with the weights of its best validation point (early
   stopping, the same rule for every model). The models:

   * the NSA model (continued from step 2),
   * a *window-only* variant: the same NSA model with its gate modules replaced by constant logits
     ``(-1e4, -1e4, +1e4)``, i.e. gates exactly ``(0, 0, 1)`` after the sigmoid, so the compressed and
     selected branches contribute exactly nothing (their outputs are multiplied by 0.0, their weights
     get zero gradients) and the layer computes sliding-window attention only; the script checks
     this against an independent banded-mask SDPA implementation (``window_only_check``); with
     ``--needle-loss answer_align`` it fine-tunes on the answer loss alone (its selection is off, so
     there is nothing to align);
   * the dense model (continued from step 2), as a reference (``--no-dense-needle`` skips it);
   * with ``--nsa-reference-needle``, the NSA model once more, fine-tuned and evaluated through the
     PyTorch reference instead of the Triton kernels (``nsa_hf.nsa_backend(varlen="reference")``; micro-batches
     of ``--reference-micro-batch`` sequences);
   * with ``--nsa-frozen-needle``, the NSA model once more with its compressors and gates frozen;
   * with ``--nsa-needle-extra LOSS@LR,...``, the NSA model once more per item, fine-tuned with that loss
     (``answer``, ``lm``, or ``both``: their sum) and peak LR;
   * with ``--nsa-slc-count-needle N``, the NSA model once more, fine-tuned and evaluated with N selected
     blocks per query (same weights; is the selection's coverage what limits retrieval?).

   ``--grad-check`` first compares the continued NSA model's gradients through the Triton kernels and
   the reference (``research/grad_check.py``; ``grad_check`` in the results).

   ``--needle-mix`` (default 0.5) plants the probe (``span``: passages + the repeated target;
   ``kv``: lines + questions) in that fraction of the sequences of every pretraining and
   continued-training batch (ordinary LM loss; the same batches for dense and NSA), so the models meet
   the copy task before the short fine-tune; the held-out text has no needles.

Precision: float32 master weights (AdamW) and a bfloat16 working copy for the forward/backward on
CUDA (the NSA Triton kernels are used automatically there); float32 everywhere on CPU (the PyTorch
reference). Every phase uses linear warm-up and cosine decay.

Run on one H100 (about 4-5 minutes with the defaults; ``--budget SECONDS`` shrinks the step counts
after timing a few steps of each model so the whole run fits, and prints the explicit command that
reproduces the run)::

    python -m research.quality --out $OUT/quality --budget 300

``--tiny`` is a CPU smoke run of the whole pipeline in well under a minute (tests), with either probe.
Writes ``results.json`` and ``results.md`` (the tables) under ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nsa_hf.sample_data import EOS, stdlib_documents, token_blocks, train_tokenizer

DEFAULT_STEPS = {"pretrain_steps": 450, "continue_steps": 150, "needle_steps": 300}
TINY = dict(
    vocab_size=512, hidden_size=64, layers=2, heads=4, kv_heads=2, seq_len=128, batch_size=2,
    max_chars=300_000, eval_blocks=4, pretrain_steps=10, continue_steps=3, needle_steps=3,
    needle_eval=4, needle_batch_size=4, needle_pairs=2, needle_digits=3, span_len=12, span_prefix=4,
    span_distractors=2, cmp_block=8, cmp_stride=4, slc_block=16, slc_count=4, window=16, copy_eval=4,
    needle_val_count=4,
)
NEEDLE_LOSSES = ("answer", "lm", "both", "answer_capped", "answer_align")
WINDOW_ONLY_GATE_LOGITS = (-1.0e4, -1.0e4, 1.0e4)  # sigmoid -> exactly (0, 0, 1) in fp32 and bf16


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m research.quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/quality", help="output directory (results.json, results.md)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, few steps, short context")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run: time a few steps of each model, then scale the step counts "
                         "down (never up) so that the run fits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--fp32", action="store_true", help="train in float32 on CUDA too (default: bf16 working copy)")
    s = ap.add_argument_group("steps and learning rates")
    s.add_argument("--pretrain-steps", type=int, default=None, help=f"default {DEFAULT_STEPS['pretrain_steps']}")
    s.add_argument("--continue-steps", type=int, default=None, help=f"default {DEFAULT_STEPS['continue_steps']}")
    s.add_argument("--needle-steps", type=int, default=None, help=f"default {DEFAULT_STEPS['needle_steps']}")
    s.add_argument("--batch-size", type=int, default=8, help="sequences of --seq-len tokens per step")
    s.add_argument("--needle-batch-size", type=int, default=None, help="default --batch-size")
    s.add_argument("--lr", type=float, default=1.5e-3, help="pretraining peak learning rate")
    s.add_argument("--continue-lr", type=float, default=5e-4, help="continued training peak learning rate")
    s.add_argument("--needle-lr", type=float, default=2e-3, help="needle fine-tune peak learning rate")
    s.add_argument("--nsa-lr-mult", type=float, default=10.0,
                   help="learning-rate multiplier of the new NSA modules (compressors, gates)")
    s.add_argument("--weight-decay", type=float, default=0.1)
    s.add_argument("--warmup-frac", type=float, default=0.1)
    m = ap.add_argument_group("model and data")
    m.add_argument("--vocab-size", type=int, default=8192)
    m.add_argument("--hidden-size", type=int, default=512)
    m.add_argument("--layers", type=int, default=8)
    m.add_argument("--heads", type=int, default=8)
    m.add_argument("--kv-heads", type=int, default=2)
    m.add_argument("--seq-len", type=int, default=2048)
    m.add_argument("--max-chars", type=int, default=1_000_000_000, help="characters of stdlib source to read")
    m.add_argument("--extra-code", nargs="*", default=[],
                   help="directories whose .py files are added to the training text (held-out text stays stdlib)")
    m.add_argument("--eval-blocks", type=int, default=128, help="held-out blocks of --seq-len tokens")
    n = ap.add_argument_group("NSA sizes (tokens)")
    n.add_argument("--cmp-block", type=int, default=32)
    n.add_argument("--cmp-stride", type=int, default=16)
    n.add_argument("--slc-block", type=int, default=64)
    n.add_argument("--slc-count", type=int, default=16,
                   help="selected blocks per query (the paper's and NSA-Llama's 16; runs 1-5 of research/RUNS.md: 8)")
    n.add_argument("--init-blocks", type=int, default=1)
    n.add_argument("--local-blocks", type=int, default=2)
    n.add_argument("--window", type=int, default=128)
    k = ap.add_argument_group("needle probe")
    k.add_argument("--probe", choices=("span", "kv"), default="span",
                   help="span: repeated random passages (induction copying; the default); kv: multi-key recall lines")
    k.add_argument("--depths", default="0.1,0.3,0.5,0.7", help="needle depths as fractions of the context")
    k.add_argument("--span-len", type=int, default=24, help="span probe: tokens per random passage")
    k.add_argument("--span-prefix", type=int, default=8,
                   help="span probe: tokens of the target passage repeated at the end as the cue; "
                        "the answer is the rest")
    k.add_argument("--span-distractors", type=int, default=7, help="span probe: other random passages per sequence")
    k.add_argument("--needle-digits", type=int, default=3, help="kv probe: digit tokens per value")
    k.add_argument("--needle-pairs", type=int, default=16,
                   help="kv probe: key/value lines planted per sequence "
                        "(the questions ask all of them, the target first)")
    k.add_argument("--needle-eval", type=int, default=128, help="held-out needles per depth")
    k.add_argument("--induction-steps", type=int, default=0,
                   help="before the text pretraining, train the dense model for this many steps on synthetic "
                        "copy sequences (random tokens in which a span repeats at a random earlier offset; loss on "
                        "the repeated tokens only), so that it forms the induction (copy) heads the probes need; "
                        "0 = off. Not scaled by --budget")
    k.add_argument("--induction-len", type=int, default=None,
                   help="tokens per synthetic copy sequence (default --seq-len: the copy heads only generalise to "
                        "distances inside the context they were trained on)")
    k.add_argument("--induction-span", type=int, default=64, help="tokens of the repeated span (< --induction-len / 2)")
    k.add_argument("--induction-repeats", type=int, default=None,
                   help="repeated spans per synthetic sequence, one per equal segment, each copying a span from "
                        "anywhere before it (default: --induction-len // (4 x --induction-span), at least 1: a "
                        "quarter of the tokens supervised, as in the CPU check)")
    k.add_argument("--induction-batch-size", type=int, default=None, help="default --batch-size")
    k.add_argument("--induction-curriculum", default=None, metavar="VOCAB:LEN:STEPS,...",
                   help="instead of --induction-steps: warm-up stages in order, each STEPS steps of LEN-token "
                        "synthetic copy sequences drawn from VOCAB token ids (0 = all ordinary ids; otherwise the first "
                        "VOCAB of a fixed random order), LEN // (4 x --induction-span) repeats each (at least 1) and "
                        "--induction-batch-size x --induction-len tokens per step; one warm-up + cosine LR schedule "
                        "over all stages. E.g. 128:256:800,0:2048:600: the copy circuit forms quickly on a small "
                        "vocabulary and short sequences, then transfers")
    k.add_argument("--induction-lr", type=float, default=1e-3)
    k.add_argument("--warmup-only", action="store_true",
                   help="stop after the copy warm-up and its copy probe (results.json has training and copy_probe)")
    k.add_argument("--copy-eval", type=int, default=64,
                   help="held-out synthetic copy sequences (--induction-len tokens) on which every model's copy "
                        "accuracy is measured per copy distance (results: copy_probe)")
    k.add_argument("--needle-loss", choices=NEEDLE_LOSSES, default="answer",
                   help="needle fine-tune loss: on the answer tokens only (answer), next-token loss on every token of "
                        "the planted sequences, answers included (lm), the sum of the two from one forward (both), or "
                        "the answer loss with each token's cross-entropy clamped at --answer-loss-cap (answer_capped), "
                        "or the answer loss plus --align-weight x the selection alignment loss at the answer positions "
                        "(answer_align; research/selection_align.py; NSA models only, outside the paper)")
    k.add_argument("--answer-loss-cap", type=float, default=2.0, metavar="NATS",
                   help="answer_capped: per-token cross-entropy cap; an answer token the model cannot currently copy "
                        "(loss above the cap, e.g. NSA did not select its source block) adds no gradient")
    k.add_argument("--align-weight", type=float, default=1.0, metavar="W",
                   help="answer_align: weight of the selection alignment loss (KL from full attention's block mass "
                        "to the selection's block scores; queries detached, the gradient enters through the compressed "
                        "keys)")
    k.add_argument("--needle-val-every", type=int, default=0, metavar="N",
                   help="every N fine-tune steps (and before the first, after the last) score --needle-val-count "
                        "validation probes per depth (training-text fillers, other passages than the evaluation's); "
                        "results: finetune.validation. 0: off")
    k.add_argument("--needle-val-count", type=int, default=32, help="validation probes per depth")
    k.add_argument("--needle-keep-best", action="store_true",
                   help="with --needle-val-every: end every fine-tune with the weights of its best validation point "
                        "(worst-depth exact match, then the mean): early stopping, the same rule for every model")
    k.add_argument("--nsa-needle-extra", default=None, metavar="LOSS@LR,...",
                   help="add NSA fine-tune variants with other --needle-loss / --needle-lr settings, e.g. "
                        "'lm@5e-4,answer@1e-4' (each starts from the same continued NSA model; results: nsa_LOSS_lrLR)")
    k.add_argument("--nsa-reference-needle", action="store_true",
                   help="add a variant: the same NSA model fine-tuned and evaluated with the PyTorch reference "
                        "instead of the Triton kernels (nsa_hf.nsa_backend(varlen='reference')), to tell kernel effects "
                        "from training dynamics (slow: O(T^2) memory per sequence)")
    k.add_argument("--reference-micro-batch", type=int, default=2,
                   help="--nsa-reference-needle: sequences per forward/backward of the reference fine-tune (gradients "
                        "accumulated over the batch; the reference's O(T^2) memory would not fit a whole batch)")
    k.add_argument("--nsa-frozen-needle", action="store_true",
                   help="add a variant: the same NSA model fine-tuned with its compressors and gates frozen (only the "
                        "Llama weights train), to see whether moving the selection's scores is what hurts")
    k.add_argument("--nsa-slc-count-needle", type=int, default=None, metavar="N",
                   help="add a variant: the continued NSA model fine-tuned and evaluated with N selected blocks per "
                        "query instead of --slc-count (is the selection's coverage what limits retrieval?)")
    k.add_argument("--grad-check", action="store_true",
                   help="after continued training, compare the NSA model's gradients (answer loss and LM loss on "
                        "--grad-check-batch probe sequences) through the Triton kernels and the PyTorch reference "
                        "(research/grad_check.py; results: grad_check). Needs CUDA (or TRITON_INTERPRET=1)")
    k.add_argument("--grad-check-batch", type=int, default=2, help="sequences in the --grad-check batch")
    k.add_argument("--no-dense-needle", action="store_true", help="skip the dense reference in the needle probe")
    k.add_argument("--needle-mix", type=float, default=0.5,
                   help="fraction of the sequences of every pretraining / continued-training batch that carry a "
                        "planted probe in the --probe format (kv: lines + questions; span: passages + the repeated "
                        "target; LM loss as on any text), so that the models can learn to copy before the short "
                        "fine-tune; 0 = plain text only")
    args = ap.parse_args(argv)
    explicit = {a.dest for a in ap._actions if any(o in (argv if argv is not None else sys.argv[1:])
                                                      for o in a.option_strings)}
    if args.tiny:
        for key, value in TINY.items():
            if key not in explicit:
                setattr(args, key, value)
    for key, value in DEFAULT_STEPS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.needle_batch_size is None:
        args.needle_batch_size = args.batch_size
    args.depths = [float(d) for d in str(args.depths).split(",")] if isinstance(args.depths, str) else args.depths
    for name in ("pretrain_steps", "continue_steps", "needle_steps", "batch_size", "needle_batch_size",
                 "seq_len", "eval_blocks", "needle_eval", "needle_digits", "needle_pairs"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.needle_val_every < 0 or args.needle_val_count < 1:
        ap.error(f"--needle-val-every {args.needle_val_every}, --needle-val-count {args.needle_val_count}: need "
                 "every >= 0 (0: off) and count >= 1")
    if args.needle_keep_best and not args.needle_val_every:
        ap.error("--needle-keep-best needs --needle-val-every N > 0 (the validation points to choose from)")
    if not 1 <= args.span_prefix < args.span_len:
        ap.error(f"--span-prefix {args.span_prefix}, --span-len {args.span_len}: need 1 <= prefix < span length")
    if args.span_distractors < 0:
        ap.error(f"--span-distractors {args.span_distractors}: must be >= 0")
    args.induction_len = args.induction_len or args.seq_len
    args.induction_batch_size = args.induction_batch_size or args.batch_size
    if args.induction_steps < 0:
        ap.error(f"--induction-steps {args.induction_steps}: must be >= 0")
    if not 2 <= args.induction_span <= args.induction_len // 2:
        ap.error(f"--induction-span {args.induction_span}: need 2 <= span <= --induction-len / 2 "
                 f"({args.induction_len // 2})")
    if args.induction_repeats is None:
        args.induction_repeats = default_repeats(args.induction_len, args.induction_span)
    if not 1 <= args.induction_repeats <= args.induction_len // (2 * args.induction_span):
        ap.error(f"--induction-repeats {args.induction_repeats}: need 1 <= repeats <= --induction-len // "
                 f"(2 x --induction-span) = {args.induction_len // (2 * args.induction_span)}")
    args.induction_stages = induction_stages(ap, args)
    if args.warmup_only and not args.induction_stages:
        ap.error("--warmup-only needs a warm-up: --induction-steps N or --induction-curriculum")
    if args.reference_micro_batch < 1 or args.grad_check_batch < 1:
        ap.error(f"--reference-micro-batch {args.reference_micro_batch} / --grad-check-batch {args.grad_check_batch}: "
                 "must be >= 1")
    try:
        args.nsa_needle_variants = parse_needle_variants(args.nsa_needle_extra)
    except ValueError as err:
        ap.error(str(err))
    if args.copy_eval < 1:
        ap.error(f"--copy-eval {args.copy_eval}: must be >= 1")
    if not 0.0 <= args.needle_mix <= 1.0:
        ap.error(f"--needle-mix {args.needle_mix}: must be in [0, 1]")
    if not all(0.0 <= d <= 1.0 for d in args.depths):
        ap.error(f"--depths {args.depths}: each must be in [0, 1]")
    if not args.align_weight >= 0:
        ap.error(f"--align-weight {args.align_weight}: must be >= 0")
    if args.seq_len < 4 * args.window:
        ap.error(f"--seq-len {args.seq_len} must be >= 4 x --window {args.window} (the probe's context)")
    return args


def parse_needle_variants(spec: str | None) -> list[tuple[str, float]]:
    """``'lm@5e-4,answer@1e-4'`` -> ``[('lm', 5e-4), ('answer', 1e-4)]`` (``--nsa-needle-extra``)."""
    out = []
    for item in filter(None, (spec or "").split(",")):
        loss, sep, lr = item.strip().partition("@")
        try:
            value = float(lr)
        except ValueError:
            value = float("nan")
        if not sep or loss not in NEEDLE_LOSSES or not value > 0:
            raise ValueError(f"--nsa-needle-extra item {item!r}: expected LOSS@LR with LOSS one of {NEEDLE_LOSSES} "
                             "and LR a positive number, e.g. lm@5e-4")
        out.append((loss, value))
    return out


def needle_variant_name(loss: str, lr: float) -> str:
    return f"nsa_{loss}_lr{lr:g}"


def induction_stages(ap, args) -> list[dict]:
    """The copy warm-up's stages from ``--induction-curriculum`` or ``--induction-steps``."""
    if args.induction_curriculum is None:
        if not args.induction_steps:
            return []
        return [{"vocab": 0, "length": args.induction_len, "steps": args.induction_steps,
                 "batch": args.induction_batch_size, "repeats": args.induction_repeats}]
    if args.induction_steps:
        ap.error("give either --induction-steps or --induction-curriculum, not both")
    stages = []
    for item in args.induction_curriculum.split(","):
        try:
            vocab, length, steps = (int(x) for x in item.split(":"))
        except ValueError:
            ap.error(f"--induction-curriculum stage {item!r}: expected VOCAB:LEN:STEPS, three integers")
        if vocab < 0 or steps < 1 or length < 2 * args.induction_span:
            ap.error(f"--induction-curriculum stage {item!r}: need VOCAB >= 0, STEPS >= 1 and LEN >= 2 x "
                     f"--induction-span ({2 * args.induction_span})")
        stages.append({"vocab": vocab, "length": length, "steps": steps,
                       "batch": max(1, args.induction_batch_size * args.induction_len // length),
                       "repeats": default_repeats(length, args.induction_span)})
    return stages


def default_repeats(length: int, span: int) -> int:
    """Repeated spans per synthetic copy sequence: a quarter of the tokens supervised, at least one."""
    return max(1, length // (4 * span))


def log(msg: str) -> None:
    print(f"[quality] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Data


def _extra_documents(dirs, min_chars: int = 2000) -> list[str]:
    docs = []
    for d in dirs:
        for path in sorted(Path(d).rglob("*.py")):
            if path.is_file() and path.stat().st_size >= min_chars:
                docs.append(path.read_text(encoding="utf-8", errors="replace"))
    return docs


def load_data(args):
    """Tokenizer, training blocks ``(N, L)`` (documents joined with EOS and cut into blocks: every
    token is used) and held-out blocks (whole blocks of single held-out files, data.token_blocks)."""
    train_docs, eval_docs = stdlib_documents(min_chars=2000, max_chars=args.max_chars)
    extra = _extra_documents(args.extra_code) if args.extra_code else []
    tokenizer = train_tokenizer(train_docs, args.vocab_size)
    ids = tokenizer(train_docs + extra, add_special_tokens=False)["input_ids"]
    stream = torch.tensor([t for doc in ids for t in doc + [tokenizer.eos_token_id]], dtype=torch.long)
    n = len(stream) // args.seq_len
    if n < 2:
        raise RuntimeError(f"only {len(stream)} training tokens: fewer than 2 blocks of {args.seq_len}")
    train_blocks = stream[: n * args.seq_len].view(n, args.seq_len)
    eval_blocks = token_blocks(tokenizer, eval_docs, args.seq_len, max_blocks=args.eval_blocks)
    info = {
        "train_documents": len(train_docs), "extra_documents": len(extra), "held_out_documents": len(eval_docs),
        "train_characters": sum(map(len, train_docs)) + sum(map(len, extra)),
        "train_tokens": int(len(stream)), "train_blocks": n, "eval_blocks": len(eval_blocks),
        "vocab": len(tokenizer), "python": sys.version.split()[0],
    }
    return tokenizer, train_blocks, eval_blocks, info


class BatchStream:
    """Deterministic batches of training blocks: batch ``i`` depends only on ``i`` and the seed (each
    epoch a fresh permutation), so two runs (dense and NSA) can train on exactly the same batches."""

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int):
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms[epoch] = torch.randperm(len(self.blocks), generator=g)
        return self._perms[epoch]

    def batch(self, i: int) -> torch.Tensor:
        n = len(self.blocks)
        idx = [self._perm(j // n)[j % n] for j in range(i * self.batch_size, (i + 1) * self.batch_size)]
        return self.blocks[torch.stack(idx)]


# ---------------------------------------------------------------------------------------------
# Models


def build_dense(args, vocab_size: int, eos_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.hidden_size,
        intermediate_size=int(args.hidden_size * 8 / 3 / 16 + 0.5) * 16,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.seq_len), tie_word_embeddings=True,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, use_cache=False,
    )
    return LlamaForCausalLM(config)


def nsa_settings(args) -> dict:
    return dict(cmp_block=args.cmp_block, cmp_stride=args.cmp_stride, slc_block=args.slc_block,
                slc_count=args.slc_count, init_blocks=args.init_blocks, local_blocks=args.local_blocks,
                window=args.window)


def convert(dense, args):
    """NSA-Llama (float32, same device) from a dense float32 model; ``nsa-hf``'s own conversion."""
    from nsa_hf.convert import convert_llama_to_nsa

    nsa, _ = convert_llama_to_nsa(dense, None, evaluate=False, progress=False, **nsa_settings(args))
    if nsa.config._attn_implementation != "nsa":
        set_attn_implementation(nsa, "nsa")
    nsa.config.use_cache = False
    return nsa


def set_attn_implementation(model, name: str) -> None:
    """Switch the attention function of every layer (they all read the shared config)."""
    try:
        model.set_attn_implementation(name)
    except Exception:  # older/newer API differences: set the field the layers read
        model.config._attn_implementation = name
    if model.config._attn_implementation != name:
        model.config._attn_implementation = name


class ConstantGate(nn.Module):
    """Replaces ``nsa_gate``: the same logits for every token, ``(cmp, slc, win)`` repeated per head."""

    def __init__(self, num_heads: int, logits=WINDOW_ONLY_GATE_LOGITS):
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits, dtype=torch.float32).repeat(num_heads), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.to(x.dtype).expand(*x.shape[:-1], self.logits.numel())


def window_only(nsa_model):
    """A copy of ``nsa_model`` whose gates are exactly (0, 0, 1): sliding-window attention only."""
    model = copy.deepcopy(nsa_model)
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.nsa_gate = ConstantGate(attn.num_heads).to(next(attn.parameters()).device)
    return model


def window_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Independent sliding-window attention (banded causal mask, SDPA) for checking the window-only
    variant: query ``(B, Hq, Q, D)``, key/value ``(B, Hkv, K, D)``, no padding; ``nsa_*`` kwargs ignored."""
    window = module.config.nsa_window
    rep = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    q_pos = torch.arange(key.shape[2] - query.shape[2], key.shape[2], device=query.device)
    k_pos = torch.arange(key.shape[2], device=query.device)
    allowed = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - window)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=allowed, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _register_window_sdpa() -> str:
    from transformers import AttentionInterface, AttentionMaskInterface

    from nsa_hf.attention import nsa_padding_mask

    AttentionInterface.register("quality_window_sdpa", window_sdpa_attention)
    AttentionMaskInterface.register("quality_window_sdpa", nsa_padding_mask)
    return "quality_window_sdpa"


@torch.no_grad()
def check_window_only(model, ids: torch.Tensor) -> dict:
    """Window-only NSA model vs banded-mask SDPA on the same weights: logit differences and gates."""
    model.eval()
    gates = torch.sigmoid(model.model.layers[0].self_attn.nsa_gate(model.model.embed_tokens(ids[:, :4]))).float()
    gate_values = gates.view(-1, 3)[0].tolist()
    nsa_logits = model(input_ids=ids, use_cache=False).logits.float()
    ref = copy.deepcopy(model)
    set_attn_implementation(ref, _register_window_sdpa())
    ref_logits = ref(input_ids=ids, use_cache=False).logits.float()
    diff = (nsa_logits - ref_logits).abs()
    return {"gates": gate_values, "gates_exact": gate_values == [0.0, 0.0, 1.0],
            "max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
            "logit_scale": ref_logits.abs().mean().item(), "tokens": int(ids.numel())}


# ---------------------------------------------------------------------------------------------
# Training


class Run:
    """AdamW on float32 master weights (``self.master``) with a working copy in ``dtype``
    (``self.model``; the same object in float32), warm-up + cosine schedule, gradient clipping 1.0."""

    def __init__(self, master, dtype, lr: float, steps: int, args):
        from nsa_hf.training import is_nsa_parameter

        self.master = master
        self.model = master if dtype == torch.float32 else copy.deepcopy(master).to(dtype)
        self.pairs = [(mp, wp) for (_, mp), wp in zip(master.named_parameters(), self.model.parameters())]
        groups = {}
        for name, p in master.named_parameters():
            nsa = is_nsa_parameter(name)
            decay = p.dim() >= 2 and not nsa
            groups.setdefault((nsa, decay), []).append(p)
        self.opt = torch.optim.AdamW(
            [{"params": ps, "lr_mult": args.nsa_lr_mult if nsa else 1.0,
              "weight_decay": args.weight_decay if decay else 0.0} for (nsa, decay), ps in groups.items()],
            lr=lr, betas=(0.9, 0.95), eps=1e-8,
        )
        self.lr, self.steps, self.warmup = lr, steps, max(1, int(args.warmup_frac * steps))
        self.step_count = 0
        self.losses: list[float] = []
        self.seconds = 0.0

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))

    def step(self, loss_fn) -> float:
        """One optimizer step. ``loss_fn(model) -> loss``, or a list of them (equal micro-batches of one
        batch: their gradients are accumulated, the loss is their mean)."""
        start = time.perf_counter()
        self.model.train()
        fns = list(loss_fn) if isinstance(loss_fn, (list, tuple)) else [loss_fn]
        value = 0.0
        for fn in fns:
            loss = fn(self.model) / len(fns)
            loss.backward()
            value += loss.item()
        if self.model is not self.master:
            for mp, wp in self.pairs:
                mp.grad = None if wp.grad is None else wp.grad.float()
                wp.grad = None
        torch.nn.utils.clip_grad_norm_(self.master.parameters(), 1.0)
        lr = self.lr_at(self.step_count)
        for g in self.opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.model is not self.master:
            with torch.no_grad():
                for mp, wp in self.pairs:
                    wp.copy_(mp)
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss is {value} at step {self.step_count}")
        self.step_count += 1
        self.losses.append(value)
        self.seconds += time.perf_counter() - start
        return value

    def snapshot(self) -> list[torch.Tensor]:
        """A CPU copy of the float32 master weights, to come back to with :meth:`restore`."""
        return [mp.detach().to("cpu", copy=True) for mp, _ in self.pairs]

    def restore(self, snapshot: list[torch.Tensor]) -> None:
        """Master weights (and the working copy) back to ``snapshot``; the optimizer state is left as is."""
        with torch.no_grad():
            for (mp, wp), saved in zip(self.pairs, snapshot):
                mp.copy_(saved)
                if wp is not mp:
                    wp.copy_(mp)

    def summary(self) -> dict:
        k = max(1, len(self.losses) // 10)
        return {"steps": self.step_count, "seconds": round(self.seconds, 2), "lr": self.lr,
                "first_losses": self.losses[:k], "last_losses": self.losses[-k:],
                "seconds_per_step": self.seconds / max(1, self.step_count)}


def lm_loss(ids: torch.Tensor):
    def fn(model):
        return model(input_ids=ids, labels=ids, use_cache=False).loss
    return fn


def lm_batch(stream: BatchStream, i: int, needles=None, mix: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Training batch ``i``; its first ``round(mix * batch)`` rows carry a needle at a random depth
    (the same for every model: depends only on ``i`` and the seed)."""
    ids = stream.batch(i)
    k = int(round(mix * len(ids))) if needles is not None else 0
    if k:
        g = torch.Generator().manual_seed(seed * 104_729 + 7 + i)
        ids = ids.clone()
        ids[:k] = needles.batch(ids[:k], torch.rand(k, generator=g).tolist(), g)[0]
    return ids


def train_lm(run: Run, stream: BatchStream, first_batch: int, device, name: str, needles=None, mix: float = 0.0,
             seed: int = 0) -> dict:
    log_every = max(1, run.steps // 10)
    for i in range(run.steps):
        loss = run.step(lm_loss(lm_batch(stream, first_batch + i, needles, mix, seed).to(device)))
        if i % log_every == 0 or i == run.steps - 1:
            log(f"  {name} step {i + 1}/{run.steps}: loss {loss:.4f} ({run.seconds:.1f} s)")
    return run.summary()


def ordinary_ids(tokenizer) -> torch.Tensor:
    """The tokenizer's ids except its special tokens (EOS, pad, ...): what random probe tokens are drawn from."""
    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(len(tokenizer)) if i not in special], dtype=torch.long)


def induction_batch(vocab_ids: torch.Tensor, batch: int, length: int, span: int, gen: torch.Generator,
                    repeats: int = 1):
    """Synthetic copy sequences: ``(B, length)`` random ordinary token ids in which ``repeats`` spans each
    repeat an earlier span at a random offset, the ``(B, length)`` mask of the positions whose token the
    repetition makes predictable (all but the first token of each repeat), and the ``(B, length)`` copy
    distance at those positions (0 elsewhere). The sequence is cut into ``repeats`` equal segments with one
    repeat in each, its source anywhere before it, so the distances range from ``span`` to nearly ``length``.
    Many supervised copies at varied offsets are what made the copy circuit form in a CPU check (a 2-layer
    Llama: after ~750 steps of 32 x 192 tokens, one 48-token span each, a quarter of the tokens supervised):
    with one short repeat per long sequence it stayed at chance for 3650 steps, and with the copy always at
    the same offset it learned a positional shortcut that does not copy anything else. It copied spans at
    distances inside its training length only, hence the default ``--induction-len`` = ``--seq-len``
    (research/RUNS.md)."""
    segment = length // repeats
    if segment < 2 * span:
        raise ValueError(f"{repeats} repeats of {span} tokens do not fit in {length} tokens: "
                         f"need length // repeats >= 2 * span")
    ids = vocab_ids[torch.randint(0, len(vocab_ids), (batch, length), generator=gen)]
    mask = torch.zeros(batch, length, dtype=torch.bool)
    distance = torch.zeros(batch, length, dtype=torch.long)
    for b in range(batch):
        for r in range(repeats):
            lo = max(r * segment, span)
            hi = (r + 1) * segment - span if r < repeats - 1 else length - span
            q = int(torch.randint(lo, hi + 1, (1,), generator=gen))  # where the repeat starts
            p = int(torch.randint(0, q - span + 1, (1,), generator=gen))  # any earlier, non-overlapping source
            ids[b, q:q + span] = ids[b, p:p + span]
            mask[b, q + 1:q + span] = True
            distance[b, q + 1:q + span] = q - p
    return ids, mask, distance


def copy_loss(ids: torch.Tensor, mask: torch.Tensor):
    """Cross-entropy on the positions of ``mask`` (the token at each is predicted by the one before)."""
    def fn(model):
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        sel = mask[:, 1:]
        return F.cross_entropy(logits[sel].float(), ids[:, 1:][sel])
    return fn


@torch.no_grad()
def copy_hits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Teacher-forced argmax hits (bool, one per position of ``mask``, in order)."""
    model.eval()
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    return (logits.argmax(-1) == ids[:, 1:])[mask[:, 1:]]


class CopyProbe:
    """Held-out synthetic copy sequences (``induction_batch``) scored by copy distance: can a model copy a
    random span from near (inside its window) and from far back? Independent of text and of the needle
    fine-tune, so it shows what the copy warm-up left in each model."""

    def __init__(self, vocab_ids, count: int, length: int, span: int, repeats: int, window: int, seed: int):
        g = torch.Generator().manual_seed(seed * 15_485_863 + 7)
        self.ids, self.mask, self.distance = induction_batch(vocab_ids, count, length, span, g, repeats)
        self.edges = sorted({e for e in (0, window, length // 4, length // 2, length) if e <= length})

    def bins(self) -> list[tuple[int, int]]:
        return [(a, b) for a, b in zip(self.edges[:-1], self.edges[1:]) if a < b]

    def accuracy(self, model, device, batch_size: int = 8) -> dict:
        """``{"all": acc, "a-b": acc per distance bin [a, b), ...}`` (None for an empty bin)."""
        hits = torch.cat([copy_hits(model, self.ids[i:i + batch_size].to(device),
                                    self.mask[i:i + batch_size].to(device)).cpu()
                          for i in range(0, len(self.ids), batch_size)]).float()
        dists = self.distance[:, 1:][self.mask[:, 1:]]  # same row-major order as the hits
        out = {"all": float(hits.mean())}
        for a, b in self.bins():
            inside = (dists >= a) & (dists < b)
            out[f"{a}-{b}"] = float(hits[inside].mean()) if inside.any() else None
        return out


def train_induction(run: Run, vocab_ids: torch.Tensor, args, device, after_stage=None) -> dict:
    """The synthetic copy warm-up (``args.induction_stages``, one LR schedule over all of them); calls
    ``after_stage(i, model)`` after each stage; returns the run summary."""
    order = vocab_ids[torch.randperm(len(vocab_ids), generator=torch.Generator().manual_seed(args.seed + 2))]
    log_every = max(1, run.steps // 10)
    i = 0
    for n, stage in enumerate(args.induction_stages):
        stage_ids = order[:stage["vocab"]] if stage["vocab"] else vocab_ids
        for _ in range(stage["steps"]):
            g = torch.Generator().manual_seed(args.seed * 15_485_863 + 11 + i)
            ids, mask, _ = induction_batch(stage_ids, stage["batch"], stage["length"], args.induction_span, g,
                                           stage["repeats"])
            loss = run.step(copy_loss(ids.to(device), mask.to(device)))
            if i % log_every == 0 or i == run.steps - 1:
                log(f"  dense induction step {i + 1}/{run.steps} (stage {n + 1}: vocabulary {len(stage_ids)}, "
                    f"{stage['batch']} x {stage['length']} tokens): copy loss {loss:.4f} ({run.seconds:.1f} s)")
            i += 1
        if after_stage is not None:
            after_stage(n, run.model)
    return run.summary()


@torch.no_grad()
def held_out_loss(model, blocks: torch.Tensor, batch_size: int, device) -> dict:
    """Mean next-token loss (nats) over all positions and over the later half of the positions."""
    model.eval()
    total = late = 0.0
    n_all = n_late = 0
    half = blocks.shape[1] // 2
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i : i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")  # (B, L-1)
        total += ce.sum().item()
        late += ce[:, half - 1 :].sum().item()
        n_all += ce.numel()
        n_late += ce[:, half - 1 :].numel()
    return {"all": total / n_all, "late_half": late / n_late}


# ---------------------------------------------------------------------------------------------
# Needle in a haystack


def scatter_starts(first: int, count: int, max_start: int, length: int, gen: torch.Generator) -> list[int]:
    """``count`` start positions of non-overlapping pieces of ``length`` tokens in ``[0, max_start]``:
    ``first`` (the target's) and the others uniformly at random (rejection sampling; the probes leave
    room for twice the pieces, so this ends quickly)."""
    starts = [first]
    while len(starts) < count:
        s = int(torch.randint(0, max_start + 1, (1,), generator=gen))
        if all(abs(s - o) >= length for o in starts):
            starts.append(s)
    return starts


class Needles:
    """Key/value recall planted in filler text, built from token ids (no tokenizer merges can differ).

    ``pairs`` lines ``\\n K = d1 .. dn\\n`` (``K`` one distinct capital-letter token per line, ``di`` one
    digit token each) are planted in the first part of a context of ``seq_len`` tokens, and the context
    ends with the questions ``\\n K = `` for every planted key (the target first, the others in random
    order), each followed by its digits. Training puts the loss on every answer digit; evaluation scores
    the first question only, whose key (the *target*) sits at the requested depth. Every planted line is
    further from every question than ``window`` tokens, and no key is asked twice, so nothing a
    question needs is inside the window."""

    def __init__(self, tokenizer, seq_len: int, digits: int, window: int, pairs: int = 1):
        ids = lambda s: tokenizer.convert_tokens_to_ids(tokenizer.tokenize(s))  # noqa: E731
        self.newline, self.equals = ids("\n"), ids(" =")
        if len(self.newline) != 1 or len(self.equals) != 1:
            raise RuntimeError("the tokenizer has no single token for '\\n' or ' ='")
        self.digit_ids = torch.tensor([tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)])
        self.key_ids = torch.tensor([tokenizer.convert_tokens_to_ids(c) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"])
        for name, t in (("digit", self.digit_ids), ("capital letter", self.key_ids)):
            if len(set(t.tolist())) != len(t) or tokenizer.unk_token_id in t.tolist():
                raise RuntimeError(f"the tokenizer has no single token per {name}")
        if not 1 <= pairs <= len(self.key_ids):
            raise ValueError(f"pairs={pairs}: must be in [1, {len(self.key_ids)}] (one capital letter per key)")
        self.seq_len, self.digits, self.window, self.pairs = seq_len, digits, window, pairs
        self.query_len = 2 + len(self.equals)  # \n K =
        self.needle_len = self.query_len + digits + 1  # \n K = digits \n
        self.tail_len = pairs * (self.query_len + digits)
        self.body_len = seq_len - self.tail_len  # filler + planted lines
        # last start of a planted line whose digits are >= window tokens from the first question
        self.max_start = self.body_len + self.query_len - 1 - window - (self.query_len + digits - 1)
        if self.max_start + 1 < 2 * pairs * self.needle_len:  # room to scatter the lines
            raise ValueError(f"seq_len={seq_len} is too short for {pairs} needles of {digits} digits beyond a "
                             f"window of {window}")
        # positions of the answer digits in the tail, and of the logits that predict them
        q = torch.arange(pairs)[:, None] * (self.query_len + digits) + self.query_len + torch.arange(digits)[None]
        self.answer_pos = (self.body_len + q).reshape(-1)  # (pairs * digits,), the target's first
        self.answer_len, self.token_metric, self.kind = digits, "digit", "kv"

    def start(self, depth: float) -> int:
        """Position of the target line's first token at ``depth`` (0 = start of the context, 1 = the last
        position that keeps it outside the window of the first question)."""
        return int(round(depth * self.max_start))

    def distance(self, depth: float) -> int:
        """Tokens from the target's last digit to the position that predicts the first answer digit."""
        last_digit = self.start(depth) + self.query_len + self.digits - 1
        return (self.body_len + self.query_len - 1) - last_digit

    def outside_window(self, depth: float) -> bool:
        return self.distance(depth) >= self.window

    def _line(self, key, value):
        return torch.cat([torch.tensor(self.newline, dtype=torch.long), key.view(1), torch.tensor(self.equals, dtype=torch.long), value,
                          torch.tensor(self.newline, dtype=torch.long)])

    def batch(self, fillers: torch.Tensor, depths, gen: torch.Generator):
        """``(B, seq_len)`` ids and ``(B, pairs, digits)`` answers (the target's first); the target line at
        ``depth``, the other lines at random non-overlapping places that are also outside the window."""
        rows, answers = [], []
        L = self.needle_len
        for filler, depth in zip(fillers, depths):
            keys = self.key_ids[torch.randperm(len(self.key_ids), generator=gen)[: self.pairs]]
            values = self.digit_ids[torch.randint(0, 10, (self.pairs, self.digits), generator=gen)]
            starts = scatter_starts(self.start(float(depth)), self.pairs, self.max_start, L, gen)
            body = torch.empty(self.body_len, dtype=torch.long)
            free = torch.ones(self.body_len, dtype=torch.bool)
            for s, k, v in zip(starts, keys, values):
                body[s : s + L] = self._line(k, v)
                free[s : s + L] = False
            body[free] = filler[: int(free.sum())]
            order = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(self.pairs - 1, generator=gen)])
            tail = [torch.cat([torch.tensor(self.newline, dtype=torch.long), keys[j].view(1), torch.tensor(self.equals, dtype=torch.long), values[j]])
                    for j in order.tolist()]
            rows.append(torch.cat([body] + tail))
            answers.append(values[order])
        return torch.stack(rows), torch.stack(answers)

    def logits(self, model, ids: torch.Tensor, target_only: bool = False) -> torch.Tensor:
        """Logits predicting the answer digits (teacher forcing): ``(B, pairs, digits, V)``, or
        ``(B, 1, digits, V)`` for the target's question only."""
        keep = self.tail_len + 1
        out = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits  # positions seq_len-keep ..
        pos = self.answer_pos[: self.digits] if target_only else self.answer_pos
        idx = (pos - 1 - (self.seq_len - keep)).to(out.device)
        return out[:, idx].float().view(ids.shape[0], -1, self.digits, out.shape[-1])


class Spans:
    """Repeated random spans (induction copying), built from token ids.

    A *passage* of ``span_len`` token ids drawn uniformly from the ordinary vocabulary (special tokens
    such as EOS/pad excluded) is planted at the probe's depth in filler text, ``distractors`` other
    random passages at random non-overlapping places; the context of ``seq_len`` tokens ends with the
    target passage again: its first ``prefix`` tokens (the cue), then the remaining
    ``span_len - prefix`` tokens, the *answer*, scored teacher-forced (and trained on) at their own
    positions. Every planted passage ends ``window`` or more tokens before the position that predicts
    the first answer token, so no answer position's sliding window reaches any planted token; a model
    that answers must copy from beyond the window. Chance per token is ``1 / len(self.vocab_ids)``.

    Same interface as :class:`Needles` (``start``, ``distance``, ``outside_window``, ``batch``,
    ``logits``, ``answer_pos``, ``answer_len``), with one "question" (``answers`` is ``(B, 1, A)``)."""

    def __init__(self, tokenizer, seq_len: int, span_len: int, prefix: int, window: int, distractors: int = 0):
        if not 1 <= prefix < span_len:
            raise ValueError(f"prefix={prefix}, span_len={span_len}: need 1 <= prefix < span_len")
        if distractors < 0:
            raise ValueError(f"distractors={distractors}: must be >= 0")
        self.vocab_ids = ordinary_ids(tokenizer)
        self.seq_len, self.span_len, self.prefix, self.window = seq_len, span_len, prefix, window
        self.distractors, self.pairs = distractors, 1
        self.answer_len, self.token_metric, self.kind = span_len - prefix, "token", "span"
        self.tail_len = span_len  # cue + answer
        self.body_len = seq_len - self.tail_len  # filler + planted passages
        self.first_answer_pos = self.body_len + prefix
        # last start of a passage whose last token is >= window tokens before the position that predicts
        # the first answer token (first_answer_pos - 1)
        self.max_start = self.first_answer_pos - 1 - window - (span_len - 1)
        if self.max_start + 1 < 2 * (1 + distractors) * span_len:  # room to scatter the passages
            raise ValueError(f"seq_len={seq_len} is too short for {1 + distractors} passages of {span_len} tokens "
                             f"beyond a window of {window}")
        self.answer_pos = self.first_answer_pos + torch.arange(self.answer_len)

    def start(self, depth: float) -> int:
        """Position of the target passage's first token at ``depth`` (0 = start of the context, 1 = the
        last position that keeps it outside the window of the first answer position)."""
        return int(round(depth * self.max_start))

    def distance(self, depth: float) -> int:
        """Tokens from the target passage's last token to the position that predicts the first answer token."""
        return (self.first_answer_pos - 1) - (self.start(depth) + self.span_len - 1)

    def outside_window(self, depth: float) -> bool:
        return self.distance(depth) >= self.window

    def batch(self, fillers: torch.Tensor, depths, gen: torch.Generator):
        """``(B, seq_len)`` ids and ``(B, 1, span_len - prefix)`` answers; the target passage at ``depth``,
        the distractors at random non-overlapping places that are also outside the window."""
        rows, answers = [], []
        L, n = self.span_len, 1 + self.distractors
        for filler, depth in zip(fillers, depths):
            passages = self.vocab_ids[torch.randint(0, len(self.vocab_ids), (n, L), generator=gen)]
            starts = scatter_starts(self.start(float(depth)), n, self.max_start, L, gen)
            body = torch.empty(self.body_len, dtype=torch.long)
            free = torch.ones(self.body_len, dtype=torch.bool)
            for s, passage in zip(starts, passages):
                body[s : s + L] = passage
                free[s : s + L] = False
            body[free] = filler[: int(free.sum())]
            rows.append(torch.cat([body, passages[0]]))  # cue (first prefix tokens) + answer
            answers.append(passages[0, self.prefix :].view(1, -1))
        return torch.stack(rows), torch.stack(answers)

    def logits(self, model, ids: torch.Tensor, target_only: bool = False) -> torch.Tensor:
        """Logits predicting the answer tokens (teacher forcing): ``(B, 1, answer_len, V)``."""
        keep = self.seq_len - self.first_answer_pos + 1
        out = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits  # positions seq_len-keep ..
        idx = (self.answer_pos - 1 - (self.seq_len - keep)).to(out.device)
        return out[:, idx].float().view(ids.shape[0], 1, self.answer_len, out.shape[-1])


def make_probe(args, tokenizer):
    """The retrieval probe chosen by ``--probe``: :class:`Spans` or :class:`Needles`."""
    if args.probe == "span":
        return Spans(tokenizer, args.seq_len, args.span_len, args.span_prefix, args.window, args.span_distractors)
    return Needles(tokenizer, args.seq_len, args.needle_digits, args.window, args.needle_pairs)


def answer_hits(logits: torch.Tensor, answers: torch.Tensor) -> tuple[int, int]:
    """Teacher-forced argmax scoring of ``(B, A, V)`` logits against ``(B, A)`` answer ids: the number of
    rows with every token right (exact match) and the number of right tokens."""
    right = logits.argmax(-1).to(answers.device) == answers
    return int(right.all(-1).sum().item()), int(right.sum().item())


def score_answers(logits: torch.Tensor, answers: torch.Tensor) -> dict:
    """Exact-match rate (whole answer right) and mean per-token accuracy of ``(B, A, V)`` logits."""
    exact, tokens = answer_hits(logits, answers)
    return {"exact": exact / answers.shape[0], "token": tokens / answers.numel()}


def needle_loss(needles: Needles, ids, answers, cap: float | None = None):
    """Cross-entropy over every answer digit of every question; with ``cap``, each token's cross-entropy
    is clamped at ``cap`` nats first (tokens above it add nothing to the gradient)."""
    def fn(model):
        logits = needles.logits(model, ids)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), answers.reshape(-1), reduction="none")
        return (ce if cap is None else ce.clamp(max=cap)).mean()
    return fn


def lm_and_answer_loss(needles: Needles, ids, answers):
    """Next-token loss on every token plus the cross-entropy over every answer token (``--needle-loss both``),
    from one forward."""
    def fn(model):
        out = model(input_ids=ids, labels=ids, use_cache=False)
        logits = out.logits[:, (needles.answer_pos - 1).to(out.logits.device)].float()
        return out.loss + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), answers.reshape(-1))
    return fn


def aligned_answer_loss(needles: Needles, ids, answers, weight: float):
    """The answer loss plus ``weight`` x the selection alignment loss of every NSA layer at the positions that
    predict the answers (``--needle-loss answer_align``; ``selection_align.SelectionAligner``)."""
    from .selection_align import SelectionAligner

    rows = needles.answer_pos - 1

    def fn(model):
        with SelectionAligner(int(rows[0]), int(rows[-1])) as aligner:
            answer = needle_loss(needles, ids, answers)(model)
        return answer + weight * aligner.loss().to(answer.device)
    return fn


def needle_train_batch(needles: Needles, train_blocks, step: int, batch_size: int, seed: int):
    """Freshly planted needles for fine-tune step ``step`` (uniform depths; same for every model)."""
    g = torch.Generator().manual_seed(seed * 7919 + 1_000_003 + step)
    fillers = train_blocks[torch.randint(0, len(train_blocks), (batch_size,), generator=g)]
    depths = torch.rand(batch_size, generator=g).tolist()
    return needles.batch(fillers, depths, g)


@torch.no_grad()
def needle_accuracy(model, needles: Needles, eval_blocks, depths, count: int, batch_size: int, seed: int, device,
                    selection: bool = False):
    """Per depth: exact-match accuracy (whole answer) and per-token accuracy (``"digit"`` for the kv probe,
    ``"token"`` for the span probe) on ``count`` held-out probes, teacher-forced argmax (``answer_hits``).
    ``selection`` (span probe, NSA models): also ``"selection"``, how often the NSA layers chose the
    selection block of each answer token's source in the passage (``selection_probe.source_coverage``),
    ``"gates"``, the mean gates per layer and head at the right and at the wrong answer tokens
    (``selection_probe.gate_means``), and ``"errors"``, what the wrong tokens were
    (``selection_probe.error_kinds``)."""
    from collections import Counter
    from contextlib import nullcontext

    from .selection_probe import SelectionRecorder, error_kinds, gate_means, source_coverage, source_hits

    selection = selection and needles.kind == "span"
    model.eval()
    out = {}
    rows = needles.answer_pos - 1  # the positions whose logits predict the answer tokens (every depth)
    recorder = SelectionRecorder(int(rows[0]), int(rows[-1])) if selection else nullcontext()
    with recorder:
        for d_i, depth in enumerate(depths):
            g = torch.Generator().manual_seed(seed * 31 + 17 + d_i)
            exact = digit = 0
            source_hit_batches, right_batches, gate_batches = [], [], []
            errors = Counter()  # summed over the batches, every kind kept (also at 0)
            source = needles.start(depth) + needles.prefix + torch.arange(needles.answer_len) if selection else None
            for start in range(0, count, batch_size):
                n = min(batch_size, count - start)
                fillers = eval_blocks[torch.arange(start, start + n) % len(eval_blocks)]
                ids, answers = needles.batch(fillers, [depth] * n, g)
                logits = needles.logits(model, ids.to(device), target_only=True)[:, 0].cpu()
                hit = answer_hits(logits, answers[:, 0])
                exact += hit[0]
                digit += hit[1]
                if selection and recorder.layers:
                    source_hit_batches.append(source_hits(recorder.layers, source.expand(n, -1),
                                                          model.config.nsa_slc_block))
                    pred = logits.argmax(-1)
                    right_batches.append(pred == answers[:, 0])
                    gate_batches.append(recorder.gates)
                    errors.update(error_kinds(pred, answers[:, 0], ids, needles.start(depth), needles.prefix,
                                              needles.answer_pos))
                    recorder.clear()
            out[f"{depth:g}"] = {"exact": exact / count, needles.token_metric: digit / (count * needles.answer_len)}
            if source_hit_batches:
                right = torch.cat(right_batches)
                out[f"{depth:g}"]["selection"] = source_coverage(torch.cat(source_hit_batches, dim=1), right)
                out[f"{depth:g}"]["gates"] = gate_means([torch.cat(per_layer) for per_layer in zip(*gate_batches)],
                                                        right)
                out[f"{depth:g}"]["errors"] = dict(errors)
    return out


def window_only_needle_loss(kind: str) -> str:
    """The window-only control's fine-tune loss for ``--needle-loss kind``: the same, except that
    ``answer_align`` becomes ``answer``. The control's gates (0, 0, 1) switch its selection off, so the
    alignment term, which trains the selection's scores, has nothing to align there (and costs time)."""
    if kind not in NEEDLE_LOSSES:
        raise ValueError(f"needle loss {kind!r}: expected one of {NEEDLE_LOSSES}")
    return "answer" if kind == "answer_align" else kind


def needle_step_loss(needles: Needles, ids: torch.Tensor, answers: torch.Tensor, kind: str, micro_batch: int = 0,
                     cap: float = 2.0, align_weight: float = 1.0):
    """The fine-tune loss of one batch (``kind`` as ``--needle-loss``), as one loss function or, with
    ``micro_batch`` > 0, a list over micro-batches of that many sequences (``Run.step`` accumulates)."""
    if kind not in NEEDLE_LOSSES:
        raise ValueError(f"needle loss {kind!r}: expected one of {NEEDLE_LOSSES}")
    make = {"lm": lambda i, a: lm_loss(i), "answer": lambda i, a: needle_loss(needles, i, a),
            "answer_capped": lambda i, a: needle_loss(needles, i, a, cap=cap),
            "both": lambda i, a: lm_and_answer_loss(needles, i, a),
            "answer_align": lambda i, a: aligned_answer_loss(needles, i, a, align_weight)}[kind]
    if micro_batch <= 0 or micro_batch >= len(ids):
        return make(ids, answers)
    if len(ids) % micro_batch:
        raise ValueError(f"micro-batch {micro_batch} does not divide the batch of {len(ids)} sequences")
    return [make(i, a) for i, a in zip(ids.split(micro_batch), answers.split(micro_batch))]


def with_slc_count(model, count: int):
    """A copy of NSA-Llama ``model`` that selects ``count`` blocks per query (its weights unchanged)."""
    wide = copy.deepcopy(model)
    wide.config.nsa_slc_count = count
    wide.config._validate_nsa()  # names the bad value and the allowed range
    params = wide.config.nsa_params()
    for layer in wide.model.layers:  # each attention layer keeps its own NSAParams
        layer.self_attn.nsa_params = params
    return wide


def frozen_nsa_modules(model):
    """``model`` with the parameters of its NSA modules (compressors, gates) frozen (``requires_grad``
    off): a fine-tune then moves only the Llama weights."""
    from nsa_hf.training import is_nsa_parameter

    frozen = 0
    for name, p in model.named_parameters():
        if is_nsa_parameter(name):
            p.requires_grad_(False)
            frozen += 1
    if not frozen:
        raise ValueError("the model has no NSA module parameters to freeze")
    return model


def grad_check(nsa, needles, train_blocks, args, device, dtype) -> dict:
    """Gradients of the continued NSA model through the Triton kernels vs the reference
    (:mod:`grad_check`) for the answer loss and the LM loss of one fine-tune batch."""
    from .grad_check import compare_backends, summary_lines

    ids, answers = needle_train_batch(needles, train_blocks, 0, args.grad_check_batch, args.seed + 1)
    ids, answers = ids.to(device), answers.to(device)
    start = time.perf_counter()
    res = compare_backends(nsa, {"answer": needle_loss(needles, ids, answers), "lm": lm_loss(ids)}, dtype)
    res["sequences"], res["seconds"] = args.grad_check_batch, time.perf_counter() - start
    for line in summary_lines({k: v for k, v in res.items() if isinstance(v, dict)}):
        log(line)
    return res


VALIDATION_SEED_OFFSET = 7  # validation probes: other passages than the held-out evaluation's (seed + 0)


def finetune_needles(run: Run, needles: Needles, train_blocks, args, device, name: str, micro_batch: int = 0,
                     loss_kind: str | None = None) -> dict:
    """``--needle-steps`` steps on freshly planted sequences: loss ``loss_kind`` (default ``--needle-loss``):
    on the answer tokens only (``answer``), next-token loss on every token of them (``lm``, the answers
    included), both summed (``both``), the capped answer loss (``answer_capped``), or the answer loss plus the
    weighted selection alignment loss (``answer_align``).

    With ``--needle-val-every N``: before the first step, every ``N`` steps and after the last, exact match
    per depth on ``--needle-val-count`` validation probes (training-text fillers, fresh random passages:
    never the held-out evaluation probes), in the summary as ``validation``; with ``--needle-keep-best``
    the weights of the best validation point (highest exact match at the worst depth, then the mean) are
    restored at the end (``kept_step``; early stopping, the same rule for every model)."""
    loss_kind = loss_kind or args.needle_loss
    log_every = max(1, run.steps // 10)
    every = args.needle_val_every
    curve, best = [], None

    def validate(step: int) -> None:
        nonlocal best
        acc = needle_accuracy(run.model, needles, train_blocks, args.depths, args.needle_val_count,
                              args.needle_batch_size, args.seed + VALIDATION_SEED_OFFSET, device)
        exact = [a["exact"] for a in acc.values()]
        curve.append({"step": step, "exact": exact})
        key = (min(exact), sum(exact) / len(exact))
        if args.needle_keep_best and (best is None or key > best[0]):
            best = (key, step, run.snapshot())

    if every:
        validate(0)
    for i in range(run.steps):
        ids, answers = needle_train_batch(needles, train_blocks, i, args.needle_batch_size, args.seed)
        loss = run.step(needle_step_loss(needles, ids.to(device), answers.to(device), loss_kind, micro_batch,
                                         args.answer_loss_cap, args.align_weight))
        if i % log_every == 0 or i == run.steps - 1:
            log(f"  {name} needle step {i + 1}/{run.steps}: {loss_kind} loss {loss:.4f} ({run.seconds:.1f} s)")
        if every and ((i + 1) % every == 0 or i == run.steps - 1):
            validate(i + 1)
    summary = run.summary()
    if every:
        summary["validation"] = {"probes_per_depth": args.needle_val_count, "curve": curve}
        log(f"  {name} validation exact match (worst depth) by step: "
            + ", ".join(f"{c['step']}: {min(c['exact']):.3f}" for c in curve))
    if best is not None:
        run.restore(best[2])
        summary["kept_step"] = best[1]
        log(f"  {name}: kept the weights of step {best[1]} (validation exact match, worst depth {best[0][0]:.3f})")
    return summary


# ---------------------------------------------------------------------------------------------
# Budget


def plan_steps(args, dense, stream, needles, train_blocks, device, dtype, elapsed: float) -> dict:
    """Time a few steps of the dense and the NSA model, then scale the step counts down so the run
    fits ``--budget`` (the first NSA steps also compile the Triton kernels)."""
    probe = {}
    for name in ("dense", "nsa"):
        model = copy.deepcopy(dense) if name == "dense" else convert(dense, args)
        run = Run(model, dtype, 1e-6, 100, args)
        times = []
        for i in range(4):
            t = time.perf_counter()
            run.step(lm_loss(stream.batch(i).to(device)))
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        ids, answers = needle_train_batch(needles, train_blocks, 0, args.needle_batch_size, args.seed)
        t = time.perf_counter()
        run.step(needle_loss(needles, ids.to(device), answers.to(device)))
        run.step(needle_loss(needles, ids.to(device), answers.to(device)))
        probe[name] = {"lm_step": min(times[1:]), "first_step": times[0],
                       "needle_step": (time.perf_counter() - t) / 2}
        del run, model
    td, tn = probe["dense"]["lm_step"], probe["nsa"]["lm_step"]
    nd, nn_ = probe["dense"]["needle_step"], probe["nsa"]["needle_step"]
    evals = 4 * math.ceil(args.eval_blocks / args.batch_size) * tn / 2  # forward ~ 1/3 of a step, rounded up
    evals += 3 * len(args.depths) * math.ceil(args.needle_eval / args.needle_batch_size) * nn_ / 2 * 2
    fixed = elapsed + evals + 20.0  # conversions, copies, checks, writing results
    per_unit = (args.pretrain_steps * td + args.continue_steps * (td + tn)
                + args.needle_steps * (2 * nn_ + (0 if args.no_dense_needle else nd)))
    available = 0.9 * args.budget - fixed - sum(p["first_step"] for p in probe.values())
    scale = min(1.0, max(0.02, available / per_unit)) if per_unit > 0 else 1.0
    planned = {k: max(1, int(getattr(args, k) * scale)) for k in DEFAULT_STEPS}
    log(f"budget {args.budget:.0f} s: step times dense {td * 1e3:.0f} ms, NSA {tn * 1e3:.0f} ms "
        f"(needle steps {nd * 1e3:.0f} / {nn_ * 1e3:.0f} ms); scale {scale:.2f} -> {planned}")
    return {"probe": probe, "scale": scale, "steps": planned}


# ---------------------------------------------------------------------------------------------
# Report


def reproduce_command(args) -> str:
    parts = ["python", "-m", "research.quality"]
    skip = {"budget", "tiny", "depths", "extra_code", "fp32", "no_dense_needle", "device", "warmup_only",
            "induction_stages", "nsa_needle_variants", "nsa_reference_needle", "nsa_frozen_needle", "grad_check",
            "needle_keep_best"}
    for key, value in vars(args).items():
        if key in skip or value is None:
            continue
        parts += [f"--{key.replace('_', '-')}", str(value)]
    parts += ["--depths", ",".join(f"{d:g}" for d in args.depths)]
    if args.extra_code:
        parts += ["--extra-code", *args.extra_code]
    parts += [flag for flag, on in (("--fp32", args.fp32), ("--no-dense-needle", args.no_dense_needle),
                                    ("--warmup-only", args.warmup_only),
                                    ("--nsa-reference-needle", args.nsa_reference_needle),
                                    ("--nsa-frozen-needle", args.nsa_frozen_needle),
                                    ("--grad-check", args.grad_check),
                                    ("--needle-keep-best", args.needle_keep_best)) if on]
    if args.device:
        parts += ["--device", args.device]
    return " ".join(shlex.quote(p) for p in parts)


NEEDLE_VARIANT_LABELS = (("nsa", "NSA"), ("nsa_reference", "NSA, reference backend"),
                         ("nsa_frozen_modules", "NSA, compressors and gates frozen"), ("window_only", "window-only"),
                         ("dense", "dense"))


def wilson_interval(hits: int, count: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a success rate measured as ``hits`` of ``count`` (95 % for z = 1.96): how far a
    depth's exact match of 128 probes can sit from the model's true rate (121 / 128 -> 0.891-0.973)."""
    if count < 1 or not 0 <= hits <= count:
        raise ValueError(f"wilson_interval: need 0 <= hits <= count and count >= 1, got hits={hits}, count={count}")
    rate = hits / count
    denom = 1 + z * z / count
    centre = rate + z * z / (2 * count)
    half = z * math.sqrt(rate * (1 - rate) / count + z * z / (4 * count * count))
    return max(0.0, (centre - half) / denom), min(1.0, (centre + half) / denom)


def retrieval_summary(exact_by_depth: dict, per_depth: int) -> dict:
    """After-fine-tune exact match of one model: pooled over the depths (equal probe counts), the worst depth with
    its Wilson interval, and whether every depth reaches the 95 % target."""
    hits = {d: round(acc * per_depth) for d, acc in exact_by_depth.items()}
    worst = min(hits, key=hits.get)
    return {"pooled": sum(hits.values()) / (per_depth * len(hits)), "worst_depth": worst,
            "worst": hits[worst] / per_depth, "worst_interval": wilson_interval(hits[worst], per_depth),
            "every_depth_ge_95pct": all(h / per_depth >= 0.95 for h in hits.values())}


def needle_variant_labels(variants) -> list[tuple[str, str]]:
    """(name, label) of the needle variants in ``variants``, the fixed ones first, in table order."""
    fixed = [(v, label) for v, label in NEEDLE_VARIANT_LABELS if v in variants]
    extra = [(v, f"NSA, {v[len('nsa_slc'):]} selected blocks" if v.startswith("nsa_slc")
              else f"NSA, {r['loss']} loss, LR {r['lr']:g}") for v, r in variants.items()
             if v not in dict(NEEDLE_VARIANT_LABELS)]
    return fixed[:1] + extra + fixed[1:]


GRAD_GROUPS = ("nsa_modules", "attention", "mlp", "embeddings_norms", "all")


def markdown(results: dict) -> str:
    loss, gaps = results["loss"], results["gaps"]
    lines = [
        "| model | held-out loss (all positions) | later half of positions |",
        "|---|---|---|",
    ]
    for key, label in (("dense_pretrained", "dense, pretrained"), ("nsa_converted", "NSA, converted (untrained)"),
                       ("dense_continued", "dense, continued"), ("nsa_continued", "NSA, converted + continued")):
        lines.append(f"| {label} | {loss[key]['all']:.4f} | {loss[key]['late_half']:.4f} |")
    lines += [
        "",
        f"NSA vs dense after the same continued training: {100 * gaps['nsa_vs_dense_continued']:+.2f} % "
        f"(later half {100 * gaps['nsa_vs_dense_continued_late']:+.2f} %; target within 1 %: "
        f"{'PASS' if results['pass']['loss_within_1pct'] else 'FAIL'}); converted untrained vs dense pretrained: "
        f"{100 * gaps['converted_vs_dense_pretrained']:+.2f} %.",
        "",
    ]
    cp = results.get("copy_probe")
    if cp:
        lines.append(f"| copy accuracy, {cp['sequences']} synthetic sequences of {cp['length']} tokens, "
                     f"{cp['repeats']} repeated {cp['span']}-token spans each | all | "
                     + " | ".join(f"distance {b}" for b in cp["bins"]) + " |")
        lines.append("|---|---|" + "---|" * len(cp["bins"]))
        for name, acc in cp["accuracy"].items():
            lines.append(f"| {name.replace('_', ' ')} | {acc['all']:.3f} | "
                         + " | ".join("-" if acc[b] is None else f"{acc[b]:.3f}" for b in cp["bins"]) + " |")
        lines.append("")
    nd = results["needle"]
    depths = list(nd["geometry"])
    if nd.get("probe", "kv") == "kv":
        tables = [("exact", "needle accuracy (exact match)")]
    else:
        n = nd["answer_tokens"]
        tables = [("exact", f"span probe: exact match (all {n} answer tokens)"),
                  ("token", f"span probe: per-token accuracy (chance {nd['chance_per_token']:.1e})")]
    for metric, title in tables:
        lines.append(f"| {title} | " + " | ".join(
            f"depth {d} (distance {nd['geometry'][d]['distance']})" for d in depths) + " |")
        lines.append("|---|" + "---|" * len(depths))
        for variant, label in needle_variant_labels(nd["results"]):
            for when in ("before", "after"):
                acc = nd["results"][variant][when]
                lines.append(f"| {label}, {when} fine-tune | " + " | ".join(f"{acc[d][metric]:.3f}" for d in depths)
                             + " |")
        lines.append("")
    per_depth = nd["per_depth"]
    lines.append(f"| exact match after the fine-tune, {per_depth} probes per depth | pooled over the depths | "
                 "worst depth (95 % Wilson interval) | >= 95 % at every depth |")
    lines.append("|---|---|---|---|")
    for variant, label in needle_variant_labels(nd["results"]):
        summary = nd["summary"][variant]
        low, high = summary["worst_interval"]
        lines.append(f"| {label} | {summary['pooled']:.3f} | {summary['worst']:.3f} at depth {summary['worst_depth']} "
                     f"({low:.3f}-{high:.3f}) | {'yes' if summary['every_depth_ge_95pct'] else 'no'} |")
    lines.append("")
    selected = [(v, label) for v, label in needle_variant_labels(nd["results"])
                if "selection" in nd["results"][v]["after"][depths[0]]]
    if selected:
        layers = len(nd["results"][selected[0][0]]["after"][depths[0]]["selection"]["per_layer"])
        lines.append("| selection per layer: answer tokens whose source block the layer did not choose, wrong / all "
                     "(a layer all of whose misses are errors is one the copy depends on) | wrong tokens | "
                     + " | ".join(f"layer {i}" for i in range(layers)) + " |")
        lines.append("|---|---|" + "---|" * layers)
        for variant, label in selected:
            for when in ("before", "after"):
                for d in depths:
                    c = nd["results"][variant][when][d]["selection"]
                    cells = (f"{w}/{m}" for w, m in zip(c["per_layer_missed_wrong"], c["per_layer_missed"]))
                    lines.append(f"| {label}, {when} fine-tune, depth {d} | {c['wrong_tokens']} | " + " | ".join(cells)
                                 + " |")
        lines.append("")
        from .selection_probe import ERROR_KINDS

        lines.append("| wrong answer tokens by what was predicted: target passage one position off / elsewhere in "
                     "the target passage / elsewhere in the probe / not in the probe | "
                     + " | ".join(f"depth {d}" for d in depths) + " |")
        lines.append("|---|" + "---|" * len(depths))
        for variant, label in selected:
            for when in ("before", "after"):
                kinds = [nd["results"][variant][when][d].get("errors") or {} for d in depths]
                lines.append(f"| {label}, {when} fine-tune | " + " | ".join(
                    " / ".join(str(k.get(name, "-")) for name in ERROR_KINDS) for k in kinds) + " |")
        lines.append("")
    validated = [(v, label) for v, label in needle_variant_labels(nd["results"])
                 if "validation" in (nd["results"][v].get("finetune") or {})]
    if validated:
        steps = [c["step"] for c in nd["results"][validated[0][0]]["finetune"]["validation"]["curve"]]
        lines.append("| validation exact match at the worst depth, by fine-tune step | "
                     + " | ".join(str(x) for x in steps) + " | kept step |")
        lines.append("|---|" + "---|" * (len(steps) + 1))
        for variant, label in validated:
            ft = nd["results"][variant]["finetune"]
            lines.append(f"| {label} | " + " | ".join(f"{min(c['exact']):.3f}" for c in ft["validation"]["curve"])
                         + f" | {ft.get('kept_step', '-')} |")
        lines.append("")
    lines += ["| fine-tune loss (mean of the first / last tenth of the steps) | first | last |", "|---|---|---|"]
    for variant, label in needle_variant_labels(nd["results"]):
        ft = nd["results"][variant].get("finetune")
        if ft:
            mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
            lines.append(f"| {label} | {mean(ft['first_losses']):.4f} | {mean(ft['last_losses']):.4f} |")
    lines.append("")
    gc = results.get("grad_check")
    if gc:
        lines += [f"| gradient check ({gc['sequences']} sequences): cosine vs the float32 reference | loss | "
                  + " | ".join(GRAD_GROUPS) + " |", "|---|---|" + "---|" * len(GRAD_GROUPS)]
        for loss_name in ("answer", "lm"):
            for cmp, label in (("triton_vs_reference_fp32", "Triton kernels"),
                               ("reference_vs_reference_fp32", f"reference, {results['dtype']}")):
                row = gc[loss_name][cmp]
                cells = [f"{row[g]['cosine']:.4f}" if g in row and row[g]["cosine"] is not None else "-"
                         for g in GRAD_GROUPS]
                lines.append(f"| {label} | {loss_name} | " + " | ".join(cells) + " |")
        lines.append("")
    if nd.get("outside_stacked_windows") is not None:
        lines.append(f"Depths outside the stacked windows ({nd['stacked_window_reach']} tokens): "
                     f"{', '.join(nd['outside_stacked_windows']) or 'none'}.")
    lines += ["", f"Reproduce: `{results['reproduce']}`", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main


def main(argv=None) -> dict:
    args = parse_args(argv)
    import nsa_hf  # noqa: F401  (registers NSA-Llama and attn_implementation="nsa")
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" and not args.fp32 else torch.float32
    if args.grad_check and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"--grad-check runs the Triton kernels: it needs a CUDA device (got {device}) or "
                         "TRITON_INTERPRET=1 (tiny shapes only)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed)

    tokenizer, train_blocks, eval_blocks, data_info = load_data(args)
    log(f"data: {data_info['train_tokens']:,} training tokens ({data_info['train_blocks']} blocks of {args.seq_len}), "
        f"{data_info['eval_blocks']} held-out blocks; vocab {data_info['vocab']} ({time.perf_counter() - t0:.1f} s)")
    stream = BatchStream(train_blocks, args.batch_size, args.seed)
    needles = make_probe(args, tokenizer)
    start_key = "needle_start" if args.probe == "kv" else "passage_start"
    geometry = {f"{d:g}": {start_key: needles.start(d), "distance": needles.distance(d),
                           "outside_window": needles.outside_window(d),
                           "outside_stacked_windows": needles.distance(d) >= args.layers * (args.window - 1)}
                for d in args.depths}
    inside = [d for d, g in geometry.items() if not g["outside_window"]]
    if inside:
        raise ValueError(f"needle depths {inside} put the {'key' if args.probe == 'kv' else 'passage'} within the "
                         f"window ({args.window}) of the question: use smaller depths or a longer --seq-len")
    log(f"probe {args.probe}: distance per depth {({d: g['distance'] for d, g in geometry.items()})}, outside the "
        f"stacked windows ({args.layers} x ({args.window} - 1)): "
        f"{[d for d, g in geometry.items() if g['outside_stacked_windows']]}")

    dense = build_dense(args, len(tokenizer), tokenizer.eos_token_id).to(device)
    n_params = sum(p.numel() for p in dense.parameters())
    log(f"dense Llama: {n_params / 1e6:.1f}M parameters on {device} ({dtype}); NSA {nsa_settings(args)}")
    results = {"args": {k: v for k, v in vars(args).items()}, "data": data_info, "device": str(device),
               "dtype": str(dtype).replace("torch.", ""), "parameters_dense": n_params,
               "nsa_settings": nsa_settings(args), "versions": {"torch": torch.__version__}}
    import transformers

    results["versions"]["transformers"] = transformers.__version__
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)

    if args.budget:
        results["budget"] = plan_steps(args, dense, stream, needles, train_blocks, device, dtype,
                                       time.perf_counter() - t0)
        for key, value in results["budget"]["steps"].items():
            setattr(args, key, value)
        set_seed(args.seed)
    results["steps"] = {k: getattr(args, k) for k in DEFAULT_STEPS}
    results["reproduce"] = reproduce_command(args)
    results["tokens"] = {k: getattr(args, k) * args.batch_size * args.seq_len for k in ("pretrain_steps", "continue_steps")}
    loss, training = {}, {}

    copy_probe = CopyProbe(ordinary_ids(tokenizer), args.copy_eval, args.induction_len, args.induction_span,
                           args.induction_repeats, args.window, args.seed)
    copy_acc = {}

    def record_copy(name: str, model) -> None:
        copy_acc[name] = copy_probe.accuracy(model, device, args.batch_size)
        log(f"copy accuracy by distance, {name.replace('_', ' ')}: "
            + ", ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in copy_acc[name].items()))

    def copy_probe_results() -> dict:
        return {"sequences": args.copy_eval, "length": args.induction_len, "span": args.induction_span,
                "repeats": args.induction_repeats, "bins": [f"{a}-{b}" for a, b in copy_probe.bins()],
                "accuracy": copy_acc}

    # 0. Optional synthetic copy warm-up (forms the induction heads the retrieval probes rely on).
    if args.induction_stages:
        steps = sum(st["steps"] for st in args.induction_stages)
        log(f"copy warm-up: {steps} steps, stages {args.induction_stages} (spans of {args.induction_span} tokens)")
        run = Run(dense, dtype, args.induction_lr, steps, args)
        last = len(args.induction_stages) - 1
        training["dense_induction"] = train_induction(
            run, ordinary_ids(tokenizer), args, device,
            after_stage=lambda n, model: record_copy("dense_after_warmup" if n == last else f"dense_after_stage_{n + 1}",
                                                     model))
        training["dense_induction"]["stages"] = args.induction_stages
        dense = run.master
        del run
        if args.warmup_only:
            results.update(training=training, copy_probe=copy_probe_results(), seconds=time.perf_counter() - t0)
            (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
            log(f"--warmup-only: done in {results['seconds']:.0f} s; results in {out / 'results.json'}")
            return results

    # 1. Pretrain dense.
    log(f"pretraining dense for {args.pretrain_steps} steps of {args.batch_size} x {args.seq_len} tokens")
    run = Run(dense, dtype, args.lr, args.pretrain_steps, args)
    training["dense_pretrain"] = train_lm(run, stream, 0, device, "dense pretrain", needles, args.needle_mix, args.seed)
    loss["dense_pretrained"] = held_out_loss(run.model, eval_blocks, args.batch_size, device)
    log(f"held-out loss, dense pretrained: {loss['dense_pretrained']['all']:.4f}")
    record_copy("dense_pretrained", run.model)
    dense = run.master
    del run

    # 2. Continue dense and NSA on the same batches.
    nsa = convert(dense, args)
    nsa_eval = nsa if dtype == torch.float32 else copy.deepcopy(nsa).to(dtype)
    loss["nsa_converted"] = held_out_loss(nsa_eval, eval_blocks, args.batch_size, device)
    record_copy("nsa_converted", nsa_eval)
    del nsa_eval
    log(f"held-out loss, NSA converted (untrained): {loss['nsa_converted']['all']:.4f}")
    first = args.pretrain_steps
    log(f"continued training, NSA then dense, {args.continue_steps} steps each on the same batches")
    run = Run(nsa, dtype, args.continue_lr, args.continue_steps, args)
    training["nsa_continue"] = train_lm(run, stream, first, device, "NSA continue", needles, args.needle_mix, args.seed)
    loss["nsa_continued"] = held_out_loss(run.model, eval_blocks, args.batch_size, device)
    record_copy("nsa_continued", run.model)
    wo_eval = window_only(run.model)
    record_copy("window_only_continued", wo_eval)
    del wo_eval
    nsa = run.master
    del run
    run = Run(copy.deepcopy(dense), dtype, args.continue_lr, args.continue_steps, args)
    training["dense_continue"] = train_lm(run, stream, first, device, "dense continue", needles, args.needle_mix,
                                         args.seed)
    loss["dense_continued"] = held_out_loss(run.model, eval_blocks, args.batch_size, device)
    record_copy("dense_continued", run.model)
    dense = run.master
    del run
    for key in ("nsa_continued", "dense_continued"):
        log(f"held-out loss, {key.replace('_', ' ')}: {loss[key]['all']:.4f}")
    rel = lambda a, b: (loss[a][k] - loss[b][k]) / loss[b][k]  # noqa: E731
    k = "all"
    gaps = {"nsa_vs_dense_continued": rel("nsa_continued", "dense_continued"),
            "converted_vs_dense_pretrained": rel("nsa_converted", "dense_pretrained")}
    k = "late_half"
    gaps["nsa_vs_dense_continued_late"] = rel("nsa_continued", "dense_continued")
    gaps["converted_vs_dense_pretrained_late"] = rel("nsa_converted", "dense_pretrained")
    results["loss"], results["gaps"] = loss, gaps
    results["copy_probe"] = copy_probe_results()
    log(f"NSA vs dense continued: {100 * gaps['nsa_vs_dense_continued']:+.2f} %; converted untrained vs dense "
        f"pretrained: {100 * gaps['converted_vs_dense_pretrained']:+.2f} %")
    results["training"] = training
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))  # partial, rewritten at the end

    if args.grad_check:
        results["grad_check"] = grad_check(nsa, needles, train_blocks, args, device, dtype)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))

    # 3. Needle in a haystack.
    # The required variants first (NSA, window-only, dense), then the exploratory ones, the slow reference
    # last: a run cut short by a device time limit keeps what the targets need.
    variants = {"nsa": nsa, "window_only": window_only(nsa)}
    settings = {"nsa": (args.needle_loss, args.needle_lr)}  # fine-tune loss and peak LR per variant
    settings["window_only"] = (window_only_needle_loss(args.needle_loss), args.needle_lr)
    if not args.no_dense_needle:
        variants["dense"] = dense
    for loss_kind, lr in args.nsa_needle_variants:
        name = needle_variant_name(loss_kind, lr)
        variants[name], settings[name] = copy.deepcopy(nsa), (loss_kind, lr)
    if args.nsa_slc_count_needle:
        name = f"nsa_slc{args.nsa_slc_count_needle}"
        variants[name], settings[name] = with_slc_count(nsa, args.nsa_slc_count_needle), settings["nsa"]
    if args.nsa_frozen_needle:
        variants["nsa_frozen_modules"] = frozen_nsa_modules(copy.deepcopy(nsa))
    if args.nsa_reference_needle:
        variants["nsa_reference"] = copy.deepcopy(nsa)
    check_ids, _ = needles.batch(eval_blocks[:2], [args.depths[0]] * min(2, len(eval_blocks)),
                                 torch.Generator().manual_seed(0))
    try:
        wo_check_model = variants["window_only"] if dtype == torch.float32 else copy.deepcopy(variants["window_only"]).to(dtype)
        results["window_only_check"] = check_window_only(wo_check_model, check_ids.to(device))
        del wo_check_model
    except Exception as err:  # reported, not fatal on the one-shot GPU run
        results["window_only_check"] = {"error": repr(err)}
    log(f"window-only check: {results['window_only_check']}")
    needle_results = {}
    needle_errors = {}
    from nsa_hf import nsa_backend

    for name, master in variants.items():
        scope = nsa_backend(varlen="reference" if name == "nsa_reference" else None)
        scope.__enter__()
        try:
            loss_kind, lr = settings.get(name, (args.needle_loss, args.needle_lr))
            run = Run(master, dtype, lr, args.needle_steps, args)
            diagnose = name.startswith("nsa")  # which blocks the selection chose at the answers
            before = needle_accuracy(run.model, needles, eval_blocks, args.depths, args.needle_eval,
                                     args.needle_batch_size, args.seed, device, selection=diagnose)
            log(f"{name}: needle accuracy before fine-tune {[v['exact'] for v in before.values()]}")
            micro = args.reference_micro_batch if name == "nsa_reference" else 0
            summary = finetune_needles(run, needles, train_blocks, args, device, name, micro, loss_kind)
            after = needle_accuracy(run.model, needles, eval_blocks, args.depths, args.needle_eval,
                                    args.needle_batch_size, args.seed, device, selection=diagnose)
            log(f"{name}: needle accuracy after fine-tune {[v['exact'] for v in after.values()]}")
            needle_results[name] = {"before": before, "after": after, "finetune": summary, "loss": loss_kind, "lr": lr}
            if loss_kind == "answer_capped":
                needle_results[name]["answer_loss_cap"] = args.answer_loss_cap
            if loss_kind == "answer_align":
                needle_results[name]["align_weight"] = args.align_weight
            del run
            results["needle_partial"] = needle_results  # a run cut short keeps the variants done so far
            (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        except Exception as err:  # keep the other variants and the loss results of this one-shot run
            if args.tiny:
                raise
            log(f"{name}: needle probe FAILED: {err!r}")
            needle_errors[name] = repr(err)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        finally:
            scope.__exit__(None, None, None)
    results["needle"] = {"probe": args.probe, "geometry": geometry, "per_depth": args.needle_eval,
                         "context": args.seq_len, "window": args.window,
                         "stacked_window_reach": args.layers * (args.window - 1),
                         "outside_stacked_windows": [d for d, g in geometry.items() if g["outside_stacked_windows"]],
                         "results": needle_results, "errors": needle_errors}
    if args.probe == "kv":
        results["needle"]["digits"] = args.needle_digits
    else:
        results["needle"].update(span_len=args.span_len, span_prefix=args.span_prefix,
                                 answer_tokens=needles.answer_len, distractors=args.span_distractors,
                                 chance_per_token=1.0 / len(needles.vocab_ids))
    results["needle"]["summary"] = {
        v: retrieval_summary({d: x["exact"] for d, x in r["after"].items()}, args.needle_eval)
        for v, r in needle_results.items() if "after" in r}
    results.pop("needle_partial", None)
    results["training"] = training
    summary = results["needle"]["summary"]
    results["pass"] = {
        "loss_within_1pct": gaps["nsa_vs_dense_continued"] <= 0.01,
        "nsa_needle_ge_95pct": summary["nsa"]["every_depth_ge_95pct"] if "nsa" in summary else None,
        "nsa_variants_ge_95pct": [v for v in summary if v.startswith("nsa") and summary[v]["every_depth_ge_95pct"]],
        "window_only_needle_le_10pct": (max(x["exact"] for x in needle_results["window_only"]["after"].values())
                                        <= 0.10 if "window_only" in summary else None),
    }
    results["seconds"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    table = markdown(results)
    (out / "results.md").write_text(table)
    print(table, flush=True)
    log(f"done in {results['seconds']:.0f} s; results in {out / 'results.json'} and {out / 'results.md'}")
    return results


if __name__ == "__main__":
    main()
