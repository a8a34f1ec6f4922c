"""The ``nsa-hf`` command line (the console script's entry point).

    nsa-hf convert SRC DST [--cmp-block N --cmp-stride N --slc-block N --slc-count N --init-blocks N
                            --local-blocks N --window N --sample-text FILE --dtype DTYPE ...]

``SRC`` is a local checkpoint directory or a Hub model id of a supported family (Llama, Mistral, Qwen2,
Qwen3); ``DST`` the directory to write the NSA checkpoint to. The conversion report is printed
(``--json`` for machine-readable output). Errors print one line and exit with status 2.

This is a top-level module, outside the package ``nsa_hf``, on purpose: ``import nsa_hf`` imports torch,
transformers and every model (it registers them with the Auto classes), which takes seconds. Here only the
standard library is imported until a sub-command runs, so ``nsa-hf --help``, ``nsa-hf --version`` and
``nsa-hf COMMAND --help`` answer at once. ``nsa_hf.cli`` re-exports :func:`build_parser` and :func:`main`
(``python -m nsa_hf.cli`` works too).
"""
from __future__ import annotations

import argparse
import json
import sys
from importlib import metadata
from pathlib import Path


def _installed_version() -> str:
    """The lookup of ``nsa_hf._version.installed_version`` (distribution metadata), done here without
    importing the package."""
    try:
        return metadata.version("nsa-hf")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``nsa-hf`` (sub-command ``convert``)."""
    parser = argparse.ArgumentParser(
        prog="nsa-hf",
        description="Native Sparse Attention for HuggingFace Transformers: tools for NSA checkpoints.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_installed_version()}",
                        help="print the installed nsa-hf version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help="run `nsa-hf COMMAND --help` for its options")
    conv = sub.add_parser(
        "convert",
        help="convert a dense Llama, Mistral, Qwen2 or Qwen3 checkpoint into NSA",
        description=(
            "Copy every weight of a dense checkpoint (model_type llama, mistral, qwen2 or qwen3) into its NSA "
            "counterpart (checked bit for bit), initialise the new "
            "NSA modules close to dense attention, measure the loss and logit gap of the untrained NSA model "
            "against the original at a length where the sparsity matters, and save the checkpoint with a "
            "model card. NSA sizes left out keep the paper's defaults (32/16/64/16/1/2/512)."
        ),
    )
    conv.add_argument("src", metavar="SRC", help="local checkpoint directory or Hub model id (llama, mistral, "
                      "qwen2 or qwen3)")
    conv.add_argument("dst", metavar="DST", help="directory to write the NSA checkpoint to (must be new or empty "
                      "unless --overwrite)")
    # One flag per nsa_kernels.NSAParams field (tests/hf/test_cli.py checks they match); not imported here so
    # that --help does not wait for torch.
    nsa = conv.add_argument_group("NSA settings (tokens)")
    nsa.add_argument("--cmp-block", type=_int, help="compression block length l (default 32)")
    nsa.add_argument("--cmp-stride", type=_int, help="compression stride d (default 16)")
    nsa.add_argument("--slc-block", type=_int, help="selection block length l' (default 64)")
    nsa.add_argument("--slc-count", type=_int, help="selected blocks per query n (default 16)")
    nsa.add_argument("--init-blocks", type=_int, help="initial blocks always selected (default 1)")
    nsa.add_argument("--local-blocks", type=_int, help="local blocks always selected (default 2)")
    nsa.add_argument("--window", type=_int, help="sliding window w (default 512)")
    nsa.add_argument("--cmp-mlp-hidden", type=_int, help="hidden width of the compressor MLP (default head_dim)")
    ev = conv.add_argument_group("evaluation")
    ev.add_argument("--sample-text", metavar="FILE", type=Path,
                    help="text file to measure the conversion gap on (default: Python stdlib sources on this machine)")
    ev.add_argument("--eval-len", type=_int, help="tokens per evaluation sequence (default: twice the "
                    "position from which NSA is sparse)")
    ev.add_argument("--eval-sequences", type=_int, default=2, help="evaluation sequences (default 2)")
    ev.add_argument("--no-eval", action="store_true", help="skip the comparison with the original model")
    ev.add_argument("--device", help="device to evaluate on (default: cuda when available, else cpu)")
    conv.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                      help="weights dtype of the converted model (default: the source's)")
    conv.add_argument("--base-model", help="Hub id of the base model for the card metadata (default: SRC when it is a Hub id)")
    conv.add_argument("--license", help="license for the card metadata (default: the source card's, when local)")
    conv.add_argument("--no-remote-code", action="store_true",
                      help="do not write the self-contained modeling code (trust_remote_code loading without nsa-hf)")
    conv.add_argument("--overwrite", action="store_true", help="replace the contents of DST if it is not empty")
    conv.add_argument("--json", action="store_true", help="print the report as JSON")
    conv.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _convert(args) -> int:
    """``nsa-hf convert``: the only place that imports nsa_hf (and so torch and transformers)."""
    import nsa_hf  # noqa: F401  (registers the NSA models)
    from nsa_hf.configuration_nsa import NSA_FIELDS
    from nsa_hf.convert import convert_to_nsa
    from nsa_kernels import NSAParams

    try:
        if args.sample_text is not None and not args.sample_text.is_file():
            raise ValueError(f"--sample-text {args.sample_text}: no such file; pass an existing text file")
        sizes = {name: getattr(args, name) for name in NSA_FIELDS if getattr(args, name) is not None}
        params = NSAParams(**sizes)  # ValueError naming the setting and its value
        _, report = convert_to_nsa(
            args.src,
            args.dst,
            params,
            cmp_mlp_hidden=args.cmp_mlp_hidden,
            dtype=args.dtype,
            sample_text=args.sample_text,
            eval_len=args.eval_len,
            eval_sequences=args.eval_sequences,
            evaluate=not args.no_eval,
            device=args.device,
            base_model=args.base_model,
            license=args.license,
            remote_code=not args.no_remote_code,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except ValueError as err:
        print(f"nsa-hf convert: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format())
        print(f"saved the {report.nsa_model_type} checkpoint to {args.dst}")
    return 0


def main(argv=None) -> int:
    """Entry point of the ``nsa-hf`` script. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    if args.command == "convert":
        return _convert(args)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover (argparse rejects it first)
    return 2


if __name__ == "__main__":
    sys.exit(main())
