"""Worker of ``tests/integration/test_fsdp_cpu.py``: a few AdamW steps of an NSA-Llama checkpoint on fixed packed
batches (the first ``NSA_ONLY_STEPS`` with only the NSA modules trainable, then all weights), either in
one process (the reference: the ranks' batches one after another, gradients accumulated) or under
``torchrun`` with FSDP2 (``fully_shard`` on every decoder layer and the root, gloo on CPU; 2 processes,
or 1 that runs both ranks' batches). The loss of a step is the token mean over the whole global batch
in every case.

    python tests/integration/fsdp_worker.py MODEL_DIR OUT_DIR                    # reference, one process
    torchrun --nproc_per_node 2 tests/integration/fsdp_worker.py MODEL_DIR OUT_DIR --fsdp

With ``--align-weight W`` the model's config gets ``nsa_align_weight = W`` (every query row sampled, so
the runs agree) and each forward's loss is the model's own: the token share of the global batch
(``num_items_in_batch``) of the language-model loss plus of ``W`` x the selection alignment term.

Writes ``OUT_DIR/losses.json`` (``{"losses", "lm_losses", "world_size", "fsdp_units"}``: the objective and
its language-model part per step) and the trained model (``nsa_hf.training.save_trained_model``: under
FSDP the full state dict gathered on rank 0).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DataCollatorWithFlattening

import nsa_hf  # noqa: F401  (registers NSA-Llama)
from nsa_hf.training import fsdp_units, save_trained_model, set_trainable

RANKS = 2
NSA_ONLY_STEPS = 2  # the first steps train only the NSA modules (train.py's --nsa-only-steps), then all
# Document lengths per step and rank: packed rows of one or two documents, odd lengths, and at step 2 a
# rank whose only document (5 tokens) is shorter than a compression block, so that rank's compressors
# see no complete block (every parameter must still take part in the backward, or FSDP's gradient
# reduce-scatter waits forever).
DOC_LENGTHS = [
    [[61, 19], [77]],
    [[5], [40, 33]],
    [[90], [23, 51]],
    [[12, 70], [66]],
]


def documents(step: int, rank: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in DOC_LENGTHS[step][rank]]


def label_count(step: int) -> int:
    """Predicted tokens of the whole global batch of ``step`` (each document's first token is not)."""
    return sum(n - 1 for rank in DOC_LENGTHS[step] for n in rank)


def summed_loss(model, docs: list[list[int]], total: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(objective, lm)``: ``lm`` the sum of next-token losses over the packed row of ``docs`` (no loss across
    document boundaries); ``objective`` the same or, given the global batch's ``total`` predicted tokens,
    the model's own loss with ``num_items_in_batch=total`` (``lm / total`` plus this row's share of the
    alignment term when the config asks for it)."""
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": d} for d in docs])
    labels = batch.pop("labels")
    if total is None:
        out = model(**batch, use_cache=False)
    else:
        out = model(**batch, labels=labels, num_items_in_batch=total, use_cache=False)
    lm = F.cross_entropy(out.logits.float()[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
    return (lm if total is None else out.loss), lm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 under torchrun (one rank per entry of DOC_LENGTHS)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--align-weight", type=float, default=0.0, help="config.nsa_align_weight (0: off)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="nsa", dtype=torch.float32)
    align = args.align_weight > 0
    if align:
        model.config.nsa_align_weight = args.align_weight
        model.config.nsa_align_rows = 4096  # more than any document: every row, the same in every run
    model.train()
    rank, world = 0, 1
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if RANKS % world:
            raise SystemExit(f"--fsdp needs a number of processes that divides {RANKS}, got {world}")
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    units = fsdp_units(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    losses, lm_losses = [], []
    for step in range(len(DOC_LENGTHS)):
        if step in (0, NSA_ONLY_STEPS):  # frozen and trainable parameters share FSDP units in the first phase
            set_trainable(model, "nsa" if step < NSA_ONLY_STEPS else "all")
        total = label_count(step)
        scale = 1 if align else 1 / total  # the model's loss is already divided by total, a token sum is not
        value = torch.zeros(2)  # (objective, lm) summed over this process's rows
        if args.fsdp:
            # this process's ranks of the global batch, one backward; FSDP averages gradients over the
            # processes: scale by their number to get the global sum
            parts = [summed_loss(model, documents(step, r, model.config.vocab_size), total if align else None)
                     for r in range(rank, RANKS, world)]
            (sum(objective for objective, _ in parts) * scale * world).backward()
        else:
            parts = []
            for r in range(RANKS):
                objective, lm = summed_loss(model, documents(step, r, model.config.vocab_size), total if align else None)
                (objective * scale).backward()
                parts.append((objective, lm))
        for objective, lm in parts:
            value += torch.stack([objective.detach() * scale * total, lm.detach()])
        if args.fsdp:
            dist.all_reduce(value)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(value[0]) / total)
        lm_losses.append(float(value[1]) / total)
    out = Path(args.out)
    save_trained_model(model, out)
    if rank == 0:
        (out / "losses.json").write_text(json.dumps({"losses": losses, "lm_losses": lm_losses, "world_size": world,
                                                     "fsdp_units": units}))
    if args.fsdp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
