"""The `cacheaug` command: one subcommand per entry point.

    cacheaug generate --prompt "Why is the sky blue?" [--coprocessor DIR] [--max-new-tokens 64]
    cacheaug score --text "..." [--point N] [--csv out.csv]
    cacheaug train --data FILE_OR_CORPUS --out-dir runs/x [--config run.yaml] [--resume]
    cacheaug eval ppl --text FILE --json OUT [--positions 32]
    cacheaug eval bench --tasks arc_easy,gsm8k --limit 50
    cacheaug prepare-data [--small]
    cacheaug app [--port 7860]

Flags of `train` come from the dataclasses in `config.py` (`--num-latents`, `--lr`, ...); a YAML
file given with `--config` sets any of them and flags override it. Errors that a user can fix
print one line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .config import ConfigError, CoprocessorConfig, TrainConfig, load_yaml

_UNSET = object()


def add_dataclass_args(parser: argparse.ArgumentParser, cls, title: str) -> None:
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        helptext = f.metadata.get("help", "") + f" (default: {f.default!r})"
        if f.type in ("bool", bool):
            group.add_argument(flag, dest=f.name, default=_UNSET, action=argparse.BooleanOptionalAction, help=helptext)
        else:
            typ = {"int": int, "float": float, "str": str}.get(str(f.type), str)
            group.add_argument(flag, dest=f.name, default=_UNSET, type=typ, help=helptext)


def build_config(cls, args, yaml_values: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in yaml_values.items() if k in names}
    values |= {k: v for k, v in vars(args).items() if k in names and v is not _UNSET}
    return cls(**values)


def _fail(msg: str) -> int:
    print(f"cacheaug: error: {msg}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------------


def cmd_train(args) -> int:
    from .train import train

    y = load_yaml(args.config) if args.config else {}
    flat = {**y.get("train", {}), **y.get("coprocessor", {})} if ("train" in y or "coprocessor" in y) else y
    unknown = set(flat) - {f.name for f in dataclasses.fields(TrainConfig)} - {
        f.name for f in dataclasses.fields(CoprocessorConfig)}
    if unknown:
        return _fail(f"{args.config}: unknown options {sorted(unknown)}")
    tcfg = build_config(TrainConfig, args, flat)
    ccfg = build_config(CoprocessorConfig, args, flat)
    if not tcfg.data:
        return _fail("--data is required: a text file or a folder made by `cacheaug prepare-data`")
    path = train(tcfg, ccfg)
    print(f"checkpoint: {path}")
    return 0


def cmd_generate(args) -> int:
    from .workbench import Workbench

    wb = Workbench.load(args.decoder or None, args.coprocessor or None)
    if wb.notice:
        print(f"note: {wb.notice}", file=sys.stderr)
    arms = ["decoder", "coprocessor"]
    final = None
    for final in wb.generate_pair(args.prompt, arms=arms, chat=not args.no_chat, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                  reaugment_every=args.reaugment_every, async_delay=args.async_delay):
        pass
    if args.json:
        print(json.dumps({k: {"text": a.text, **a.stats()} for k, a in final.items()}, indent=1, ensure_ascii=False))
        return 0
    for name in arms:
        a = final[name]
        label = "decoder" if name == "decoder" else f"decoder + coprocessor ({wb.coprocessor_source})"
        s = a.stats()
        print(f"=== {label}  [ttft {s['time_to_first_token_s']}s, {s['tokens_per_s']} tok/s]")
        print(a.text)
        print()
    return 0


def cmd_score(args) -> int:
    import viz

    from .workbench import Workbench

    wb = Workbench.load(args.decoder or None, args.coprocessor or None)
    text = open(args.file, encoding="utf-8").read() if args.file else args.text
    res = wb.score_text(text, point=args.point, with_attention=False)
    table = viz.summary_table(res["nll_base"], res["nll_aug"])
    print(f"augmented after token {res['point']}; scored {int((~__import__('numpy').isnan(res['nll_aug'])).sum())} tokens")
    print(table.to_string(index=False))
    if args.csv:
        viz.frame_to_csv(viz.per_token_frame(res["tokens"], res["nll_base"], res["nll_aug"]), args.csv)
        print(f"per-token CSV: {args.csv}")
    return 0


def cmd_app(args) -> int:
    import app as app_module

    return app_module.main(["--port", str(args.port)] + (["--share"] if args.share else [])
                           + (["--coprocessor", args.coprocessor] if args.coprocessor else [])
                           + (["--decoder", args.decoder] if args.decoder else []))


def cmd_export(args) -> int:
    import torch

    from .checkpoint import checkpoint_size_mib, export_checkpoint

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    path = export_checkpoint(args.src, args.dst, dtype, status=args.status or None)
    print(f"{path}: {checkpoint_size_mib(path):.1f} MiB of weights")
    return 0


def _common_model_args(p):
    p.add_argument("--decoder", default="", help="decoder: empty = embedded SmolLM2-135M-Instruct, a folder, or a Hub id")
    p.add_argument("--coprocessor", default="", help="coprocessor checkpoint folder (default: the shipped one)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cacheaug", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a coprocessor (one-pass multi-point)")
    p.add_argument("--config", default="", help="YAML file with any of the options below")
    add_dataclass_args(p, TrainConfig, "training")
    add_dataclass_args(p, CoprocessorConfig, "coprocessor")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("generate", help="generate with and without augmentation, side by side")
    _common_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reaugment-every", type=int, default=0, help="call the coprocessor again every k tokens")
    p.add_argument("--async-delay", type=int, default=0, help="latents arrive this many tokens late")
    p.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the chat template")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("score", help="per-token loss with and without latents inserted at one point")
    _common_model_args(p)
    p.add_argument("--text", default="")
    p.add_argument("--file", default="")
    p.add_argument("--point", type=int, default=None, help="augment after this token (default: a quarter in)")
    p.add_argument("--csv", default="", help="write the per-token table here")
    p.set_defaults(fn=cmd_score)

    p = sub.add_parser("export", help="copy a checkpoint's weights (no trainer state), e.g. in bf16 to ship")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--status", default="", help="a status line for the model card and the app")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("app", help="start the analysis web app")
    _common_model_args(p)
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true")
    p.set_defaults(fn=cmd_app)

    try:
        from . import evaluate

        evaluate.register_cli(sub)
    except ImportError:
        pass
    try:
        from . import data

        data.register_cli(sub)
    except ImportError:
        pass
    return ap


def main(argv=None) -> int:
    from .checkpoint import CheckpointError
    from .decoder import DecoderLoadError
    from .workbench import InputError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except (ConfigError, CheckpointError, DecoderLoadError, InputError, FileNotFoundError) as e:
        return _fail(str(e))
    except Exception as e:  # training errors and the like carry their own message
        if type(e).__name__ in ("TrainingError", "DataError", "EvalError"):
            return _fail(str(e))
        raise


if __name__ == "__main__":
    sys.exit(main())
