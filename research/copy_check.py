"""Does a small Llama learn to copy? The CPU checks behind the quality experiment's diagnosis of the
retrieval probe (research/RUNS.md): a 2-layer ``LlamaForCausalLM`` (hidden 128, 4 heads) trained from
scratch on random-token sequences with repeated spans, reporting the teacher-forced accuracy on the
repeated tokens (the copies), then, for the trained model, on a 16-token span repeated 100 / 400 / 800
tokens later.

Tasks (``--task``):

* ``sparse``: 256 tokens (vocabulary 512), one 16-token span repeated 48+ tokens after its source
  (``--loss lm``: every token; ``--loss copy``: the repeats only) - the probe's situation: few copies;
* ``half``: 128 tokens (vocabulary 128), the second half repeats the first - always the same offset;
* ``varied``: 192 tokens (vocabulary 128), a 48-token span repeated at a random earlier offset, loss on
  the repeats (``research/quality.py --induction-steps`` uses this kind of data).

    python -m research.copy_check --task varied --steps 2400     # ~10 min on 1 CPU thread
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

TASKS = {"sparse": dict(vocab=512, length=256, span=16), "half": dict(vocab=128, length=128, span=64),
         "varied": dict(vocab=128, length=192, span=48)}


def make_batch(task: str, batch: int, gen: torch.Generator):
    """``(B, T)`` ids and the mask of the positions whose token the repetition makes predictable."""
    cfg = TASKS[task]
    vocab, length, span = cfg["vocab"], cfg["length"], cfg["span"]
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        if task == "half":
            q, p = length // 2, 0
        elif task == "sparse":
            q = int(torch.randint(length // 2, length - span, (1,), generator=gen))
            p = int(torch.randint(0, q - span - 48, (1,), generator=gen))
        else:
            q = int(torch.randint(span + 1, length - span + 1, (1,), generator=gen))
            p = int(torch.randint(0, q - span + 1, (1,), generator=gen))
        ids[b, q:q + span] = ids[b, p:p + span]
        mask[b, q + 1:q + span] = True
    return ids, mask


def build_model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=32, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg)


def copy_accuracy(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> float:
    return float((logits[:, :-1].argmax(-1) == ids[:, 1:])[mask[:, 1:]].float().mean())


def transfer(model, vocab: int, gen: torch.Generator, distances=(100, 400, 800), batch: int = 32) -> dict:
    """Copy accuracy on a 16-token span (tokens 8..23) repeated at the end, ``distance`` tokens later."""
    out = {}
    with torch.no_grad():
        for dist in distances:
            ids = torch.randint(0, vocab, (batch, dist + 64), generator=gen)
            ids[:, -16:] = ids[:, 8:24]
            logits = model(ids).logits[:, -16:-1]
            out[dist] = float((logits.argmax(-1) == ids[:, -15:]).float().mean())
    return out


def parse_args(argv=None):
    """The command line (``argv``: the arguments after the program name; ``None``: ``sys.argv``)."""
    ap = argparse.ArgumentParser(prog="python -m research.copy_check", description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=list(TASKS), default="varied")
    ap.add_argument("--loss", choices=["lm", "copy"], default="copy", help="sparse task: every token or the copies only")
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps {args.steps}: must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    vocab = TASKS[args.task]["vocab"]
    model = build_model(vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    t0, history = time.time(), []
    for step in range(args.steps):
        ids, mask = make_batch(args.task, args.batch, gen)
        logits = model(ids).logits
        if args.task == "sparse" and args.loss == "lm":
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
        else:
            sel = mask[:, 1:]
            loss = F.cross_entropy(logits[:, :-1][sel], ids[:, 1:][sel])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % args.log_every == 0 or step == args.steps - 1:
            acc = copy_accuracy(logits.detach(), ids, mask)
            history.append({"step": step, "loss": loss.item(), "copy_accuracy": acc})
            print(f"step {step} loss {loss.item():.3f} copy accuracy {acc:.3f} ({time.time() - t0:.0f} s)", flush=True)
    moved = transfer(model, vocab, gen)
    for dist, acc in moved.items():
        print(f"16-token span repeated {dist} tokens later: copy accuracy {acc:.3f}")
    return {"history": history, "transfer": moved}


if __name__ == "__main__":
    main()
