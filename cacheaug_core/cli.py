"""The `cacheaug` command: one subcommand per entry point.

    cacheaug generate --prompt "Why is the sky blue?" [--coprocessor DIR] [--pause DIR] [--max-new-tokens 64]
    cacheaug score --text "..." [--point N] [--csv out.csv]           # mode (a): augment once
    cacheaug score --text "..." --every [--positions 16] [--csv m.csv] # mode (b): after every token
    cacheaug latents --prompt "..." [--prompt "..."] [--json OUT] [--html pca.html]
    cacheaug corpus --text X.jsonl --json OUT [--csv tokens.csv] [--html curve.html]   # default: bundled wiki
    cacheaug info [--coprocessor DIR] [--json]
    cacheaug export SRC DST [--dtype bf16]
    cacheaug push DIR user/repo [--revision BRANCH] [--private]   # weights, config, card to the Hub
    cacheaug train --data FILE_OR_CORPUS --out-dir runs/x [--config run.yaml]
    cacheaug train --out-dir runs/x --resume [--steps N]   # the run's saved settings, data and decoder
    cacheaug eval ppl --text FILE --json OUT [--positions 32]
    cacheaug eval bench --tasks arc_easy,gsm8k --limit 50
    cacheaug prepare-data [--small] [--decoder D]
    cacheaug tokenize notes.jsonl --out data/mine [--decoder D] [--text-column text]   # your own corpus
    cacheaug app [--port 7860]                  # default port: $GRADIO_SERVER_PORT or 7860

Flags of `train` come from the dataclasses in `config.py` (`--num-latents`, `--lr`, ...); a YAML
file given with `--config` sets any of them and flags override it. Errors that a user can fix
print one line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

_STARTED = time.perf_counter()   # a results file's "seconds": the whole command, model load included

from .config import ConfigError, CoprocessorConfig, TrainConfig, check_types, load_yaml

_UNSET = object()
# optional packages -> the extra that installs them (pyproject.toml); the core needs none of them
EXTRAS = {"gradio": "app", "plotly": "app", "pandas": "app", "sklearn": "app", "datasets": "data", "pyarrow": "data",
          "rdata": "data", "zstandard": "data", "lm_eval": "eval", "tensorboard": "track", "quack": "kernels"}


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


def _explicit(cls, args, flat: dict) -> dict:
    """The options of dataclass `cls` the user set: in the YAML file (`flat`) or as flags (flags win)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return ({k: v for k, v in flat.items() if k in names}
            | {k: v for k, v in vars(args).items() if k in names and v is not _UNSET})


def build_config(cls, args, yaml_values: dict):
    return cls(**_explicit(cls, args, yaml_values))   # the rest: the dataclass's defaults


def _fail(msg: str) -> int:
    print(f"cacheaug: error: {msg}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------------


def cmd_train(args) -> int:
    from .checkpoint import read_config
    from .train import resume_settings, saved_train_config, train

    y = load_yaml(args.config) if args.config else {}
    if "train" in y or "coprocessor" in y:
        for section in ("train", "coprocessor"):
            if not isinstance(y.get(section) or {}, dict):
                return _fail(f"{args.config}: the '{section}:' section must be a mapping of option: value, "
                             f"got {y[section]!r}")
        flat = {**(y.get("train") or {}), **(y.get("coprocessor") or {})}
    else:
        flat = y
    unknown = set(flat) - {f.name for f in dataclasses.fields(TrainConfig)} - {
        f.name for f in dataclasses.fields(CoprocessorConfig)}
    if unknown:
        return _fail(f"{args.config}: unknown options {sorted(unknown)}")
    flat = check_types(CoprocessorConfig, check_types(TrainConfig, flat, args.config), args.config)
    tcfg = build_config(TrainConfig, args, flat)
    ccfg = build_config(CoprocessorConfig, args, flat)
    if tcfg.resume:
        # A resumed run continues with its own saved settings: only what the user set (a flag or
        # the YAML file) may replace them, and not what shapes the data stream (train.RESUME_FIXED).
        saved = saved_train_config(tcfg.out_dir)
        if saved is not None:
            values, notices = resume_settings(saved, _explicit(TrainConfig, args, flat))
            for n in notices:
                print(f"note: {n}", file=sys.stderr)
            tcfg = TrainConfig(**(values | {"out_dir": tcfg.out_dir, "resume": True}))
        # The coprocessor's layout is the checkpoint's: a different one asked for would be silently
        # ignored, so it is refused.
        asked = _explicit(CoprocessorConfig, args, flat)
        last = Path(tcfg.out_dir) / "last"
        if asked and (last / "config.json").is_file():
            have = read_config(last)["coprocessor"]
            differ = sorted(k for k, v in asked.items() if k in have and have[k] != v)
            if differ:
                return _fail("--resume continues the checkpoint's coprocessor; it has "
                             + ", ".join(f"{k}={have[k]!r}" for k in differ)
                             + f" (asked: {', '.join(f'{k}={asked[k]!r}' for k in differ)}). Start a new "
                             "--out-dir (with --init-from to start from its weights) for another layout")
    path = train(tcfg, ccfg)
    print(f"checkpoint: {path}")
    return 0


def cmd_generate(args) -> int:
    from .workbench import Workbench, clean_text

    if args.max_new_tokens < 1:
        return _fail("--max-new-tokens must be at least 1")
    clean_text(args.prompt)  # an empty prompt fails here, before the model is loaded
    wb = Workbench.load(args.decoder or None, args.coprocessor or None, pause=args.pause or None)
    if wb.notice:
        print(f"note: {wb.notice}", file=sys.stderr)
    arms = ["decoder", "coprocessor"] + (["pause"] if wb.pause is not None else [])
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
        label = {"decoder": "decoder", "coprocessor": f"decoder + coprocessor ({wb.coprocessor_source})",
                 "pause": f"decoder + pause tokens ({wb.pause_source})"}[name]
        s = a.stats()
        print(f"=== {label}  [ttft {s['time_to_first_token_s']}s, {s['tokens_per_s']} tok/s]")
        print(a.text)
        print()
    return 0


def cmd_score(args) -> int:
    import numpy as np
    from cacheaug_core import viz
    from cacheaug_core.viz import app_views as views

    from .workbench import Workbench, clean_text

    if args.positions < 1:
        return _fail("--positions must be at least 1")
    text = _read_text_file(args.file) if args.file else args.text
    clean_text(text)  # an empty text fails here, before the model is loaded
    wb = Workbench.load(args.decoder or None, args.coprocessor or None)
    if args.every:
        return _score_every(wb, text, args)
    res = wb.score_text(text, point=args.point, with_attention=False)
    if res.get("notice"):
        print(f"note: {res['notice']}", file=sys.stderr)
    table = viz.summary_table(res["nll_base"], res["nll_aug"])
    print(f"augmented after token {res['point']}; scored {int(np.isfinite(res['nll_aug']).sum())} tokens")
    print(table.to_string(index=False))
    if args.csv:
        viz.frame_to_csv(viz.per_token_frame(res["tokens"], res["nll_base"], res["nll_aug"]), args.csv)
        print(f"per-token CSV: {args.csv}")
    if args.json or args.html:
        by_pos = views.by_position_once(res["nll_base"], res["nll_aug"], res["point"])
        _write_score_exports(wb, args, by_pos, {"mode": "once", "point": res["point"], "text": text,
                                            "tokens": res["tokens"], "nll_base": res["nll_base"],
                                            "nll_aug": res["nll_aug"], "summary": table})
    return 0


def _read_text_file(path: str) -> str:
    """A --file's text. Bytes that are not UTF-8 become U+FFFD, with a notice, rather than stop the run."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"--file {path} is a folder; give a text file")
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        print(f"note: {path} is not valid UTF-8; undecodable bytes were replaced by U+FFFD", file=sys.stderr)
        return data.decode("utf-8", errors="replace")


def _score_every(wb, text: str, args) -> int:
    """Mode (b): latents after every token; the table is the mean NLL of the n-th token ahead."""
    import numpy as np
    import pandas as pd
    from cacheaug_core import viz
    from cacheaug_core.viz import app_views as views

    from tqdm.auto import tqdm

    # score_every reports the share of augmentation points done (0..1); the bar counts percent
    with tqdm(total=100, desc="score", unit="%", file=sys.stderr) as bar:
        res = wb.score_every(text, positions=args.positions, progress=lambda f: bar.update(round(100 * f) - bar.n))
    if res.get("notice"):
        print(f"note: {res['notice']}", file=sys.stderr)
    base, aug, toks = res["nll_base"], res["nll_aug"], res["tokens"]
    by_pos = views.by_position_every(base, aug)
    table = by_pos.assign(delta=by_pos.nll_aug - by_pos.nll_base,
                          **{"relative ppl change %": np.expm1(by_pos.nll_aug - by_pos.nll_base) * 100})
    print(f"augmented after each of {base.shape[0]} tokens; token n ahead scored for n = 1..{base.shape[1]} "
          "(delta = NLL(decoder+coprocessor) - NLL(decoder), negative = the latents help)")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    if args.csv:
        # Long format: one row per (augmentation point, position ahead) that lies inside the text.
        P, A = aug.shape
        pts, ahead = np.meshgrid(np.arange(P), np.arange(1, A + 1), indexing="ij")
        keep = np.isfinite(aug) & np.isfinite(base)
        target = (pts + ahead)[keep]
        frame = pd.DataFrame({
            "point": pts[keep], "point_token": pd.Series([viz.clean_token(toks[i]) for i in pts[keep]], dtype=object),
            "ahead": ahead[keep], "token_index": target,
            "token": pd.Series([viz.clean_token(toks[i]) for i in target], dtype=object),
            "nll_base": base[keep], "nll_aug": aug[keep], "delta": (aug - base)[keep]})
        viz.frame_to_csv(frame, args.csv)
        print(f"matrix CSV (point x position ahead, long format): {args.csv}")
    _write_score_exports(wb, args, by_pos, {"mode": "every", "positions": int(base.shape[1]), "text": text,
                                        "tokens": toks, "nll_base_by_point": base, "nll_aug_by_point": aug})
    return 0


def _write_score_exports(wb, args, by_pos, run: dict) -> None:
    from cacheaug_core import viz
    from cacheaug_core.viz import app_views as views

    from .eval.provenance import provenance

    if args.json:
        views.write_json(run | {"by_position": by_pos, "provenance": provenance(wb, _STARTED, args)}, args.json)
        print(f"run JSON: {args.json}")
    if args.html:
        _write_html(viz.delta_by_position_figure(by_pos, title="Perplexity change by position ahead"), args.html)
        print(f"figure HTML: {args.html}")


def cmd_latents(args) -> int:
    """The app's Latents tab: PCA figure, per-latent read-out, optional attention from a continuation."""
    from cacheaug_core import viz
    from cacheaug_core.viz import app_views as views

    from .eval.provenance import provenance
    from .workbench import Workbench, clean_text

    prompts = [clean_text(p)[0] for p in args.prompt]  # empty prompts fail before the model loads
    if args.dims not in (2, 3):
        return _fail("--dims must be 2 or 3")
    wb = Workbench.load(args.decoder or None, args.coprocessor or None)
    if wb.notice:
        print(f"note: {wb.notice}", file=sys.stderr)
    res = wb.latents(prompts, top_k=args.top_k, chat=args.chat)
    coords, evr = viz.latent_pca(res["latents"], n_components=args.dims)
    axes = wb.reference_axes(3) if args.axes == "reference" else None
    if axes is not None:   # the app's default: axes fitted on fixed reference prompts, comparable across runs
        coords, share = viz.project_latents(res["latents"], axes, args.dims)
        print(f"reference axes ({len(axes['prompts'])} fixed prompts); these latents' variance along them: "
              + ", ".join(f"PC{i + 1} {100 * x:.1f}%" for i, x in enumerate(share)))
    readout = views.latent_readout_with_prompts(viz.latent_readout_frame(res["top_tokens"], res["top_probs"]),
                                                res["prompt_ids"], res["latent_index"], res["labels"])
    print(f"{len(prompts)} prompt(s) x {res['latents'].shape[0] // len(prompts)} latents; "
          + views.explained_variance_text(evr))
    print(readout.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    attn = None
    if args.continuation:
        # As in the app: prompt + continuation as plain text, latents after the prompt's last token.
        full = views.join_prompt_continuation(prompts[0], clean_text(args.continuation)[0])
        point = int(wb.encode(prompts[0]).shape[1]) - 1
        sc = wb.score_text(full, point=point, top_k=1, with_attention=True)
        attn = {"tokens": sc["tokens"][sc["point"] + 1:], "mass": sc["attn_to_latents"]}
        share = attn["mass"].sum(-1)
        print(f"attention from the {len(attn['tokens'])} continuation tokens to prompt 1's latents: "
              f"mean {share.mean():.4f}, max {share.max():.4f} (share of attention, mean over heads and layers)")
    if args.csv:
        viz.frame_to_csv(readout, args.csv)
        print(f"read-out CSV: {args.csv}")
    if args.html:
        fig = viz.latent_pca_figure(res["latents"], res["prompt_ids"], res["latent_index"], labels=res["labels"],
                                    color_by=args.color_by, dims=args.dims, hover_tokens=res["top_tokens"],
                                    norms=res["norms"], axes=axes, overlay=res["pause_latents"])
        _write_html(fig, args.html)
        print(f"PCA figure HTML: {args.html}")
    if args.attention_html and attn is not None:
        fig = viz.attention_to_latents_figure(attn["tokens"], attn["mass"],
                                              title="Attention from the continuation to prompt 1's latents")
        _write_html(fig, args.attention_html)
        print(f"attention figure HTML: {args.attention_html}")
    if args.json:
        views.write_json({"prompts": prompts, "labels": res["labels"], "prompt_ids": res["prompt_ids"],
                          "latent_index": res["latent_index"], "norms": res["norms"], "pca": coords,
                          "explained_variance": evr, "readout": readout, "latents": res["latents"],
                          "attention_to_latents": attn, "axes": args.axes, "pause_latents": res["pause_latents"],
                          "model": {"decoder": wb.info.name, "coprocessor": wb.coprocessor_source},
                          "provenance": provenance(wb, _STARTED, args)}, args.json)
        print(f"JSON: {args.json}")
    return 0


def _write_html(fig, path: str) -> None:
    from cacheaug_core import viz

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(viz.figure_to_html(fig), encoding="utf-8")


def cmd_corpus(args) -> int:
    from . import corpus
    from .workbench import Workbench

    try:
        return corpus.run_cli(args, lambda: Workbench.load(args.decoder or None, args.coprocessor or None,
                                                           pause=args.pause or None))
    except corpus.CorpusError as e:
        return _fail(str(e))


def cmd_info(args) -> int:
    """The app's Model tab: decoder, coprocessor settings, notice, training summary, evaluation."""
    from cacheaug_core.viz import app_views as views

    from .workbench import Workbench

    wb = Workbench.load(args.decoder or None, args.coprocessor or None, pause=args.pause or None)
    st = wb.status()
    if args.json:
        print(json.dumps(views.jsonable(st), indent=1, ensure_ascii=False))
        return 0
    print("## Decoder\n")
    print(_kv_table(st["decoder"]))
    print(f"\n## Coprocessor ({st['coprocessor_source']})\n")
    print(_kv_table(st["coprocessor"]))
    if st.get("pause"):
        print(f"\n## Pause-token arm ({st['pause']['source']})\n")
        print(_kv_table(st["pause"]["config"]))
    if st["notice"]:
        print(f"\n## Status\n\n{st['notice']}")
    training = {k: v for k, v in (st["training"] or {}).items() if not isinstance(v, (dict, list))}
    print("\n## Training\n")
    print(_kv_table(training) if training else "_No training summary: the coprocessor is untrained or the "
          "checkpoint stores none._")
    print("\n## Evaluation\n")
    print(views.evaluation_markdown(st["evaluation"]))
    return 0


def _kv_table(d: dict) -> str:
    return "\n".join(["| key | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in d.items()])


def cmd_app(args) -> int:
    import importlib

    # by its module name (not `from cacheaug_core import app`): what sys.modules holds is what runs
    app_module = importlib.import_module("cacheaug_core.app")

    # The port is passed only when given, so app.py's default ($GRADIO_SERVER_PORT or 7860) applies.
    return app_module.main((["--port", str(args.port)] if args.port is not None else [])
                           + (["--share"] if args.share else [])
                           + (["--coprocessor", args.coprocessor] if args.coprocessor else [])
                           + (["--decoder", args.decoder] if args.decoder else [])
                           + (["--pause", args.pause] if args.pause else []))


def cmd_export(args) -> int:
    import torch

    from .checkpoint import checkpoint_size_mib, export_checkpoint

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    path = export_checkpoint(args.src, args.dst, dtype, status=args.status or None)
    print(f"{path}: {checkpoint_size_mib(path):.1f} MiB of weights")
    return 0


def cmd_push(args) -> int:
    from .checkpoint import CheckpointError, hub_files, push_to_hub

    files = hub_files(args.dir)
    try:
        url = push_to_hub(args.dir, args.repo, revision=args.revision or None, private=args.private or None,
                          commit_message=args.message or None)
    except CheckpointError:
        raise
    except Exception as e:   # no token, no network, no permission: the Hub's first line says which
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return _fail(f"push to {args.repo} failed: {type(e).__name__}: {first}")
    print(f"pushed {', '.join(f.name for f in files)} and a model card to {args.repo}: {url}")
    return 0


def _common_model_args(p):
    p.add_argument("--decoder", default="", help="decoder: empty = embedded SmolLM2-135M-Instruct, a folder, or a Hub id")
    p.add_argument("--coprocessor", default="", help="coprocessor checkpoint: a folder or a Hub id user/repo[@revision] "
                   "(default: the shipped one)")


def _pause_arg(p):
    p.add_argument("--pause", default="", help="a pause-token checkpoint folder (body 'none'): an extra arm")


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
    _pause_arg(p)
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

    p = sub.add_parser("score", help="per-token loss with and without latents, inserted at one point or "
                       "after every token (--every)")
    _common_model_args(p)
    p.add_argument("--text", default="")
    p.add_argument("--file", default="")
    p.add_argument("--point", type=int, default=None, help="augment after this token (default: a quarter in)")
    p.add_argument("--every", action="store_true",
                   help="mode (b): latents after every token, the n-th token ahead scored (ignores --point)")
    p.add_argument("--positions", type=int, default=16, help="with --every: positions ahead scored")
    p.add_argument("--csv", default="", help="write the per-token table (with --every: the point x position "
                   "matrix, one row per cell) here")
    p.add_argument("--json", default="", help="write the run (tokens, NLLs, by-position table) as JSON here")
    p.add_argument("--html", default="", help="write the perplexity-change-by-position figure (HTML) here")
    p.set_defaults(fn=cmd_score)

    p = sub.add_parser("latents", help="the latents of prompts: PCA figure and what each latent reads as")
    _common_model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    p.add_argument("--top-k", type=int, default=5, help="closest tokens per latent through the LM head")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    p.add_argument("--dims", type=int, default=2, help="PCA dimensions of the figure: 2 or 3")
    p.add_argument("--color-by", choices=["prompt", "latent"], default="prompt")
    p.add_argument("--axes", choices=["own", "reference"], default="own",
                   help="PCA axes: these prompts' own, or axes fitted on fixed reference prompts (as the app), "
                   "which make runs comparable")
    p.add_argument("--continuation", default="", help="text after the first prompt: report the attention its "
                   "tokens pay to that prompt's latents")
    p.add_argument("--json", default="", help="write latents, PCA coordinates and the read-out as JSON here")
    p.add_argument("--html", default="", help="write the PCA figure (standalone HTML) here")
    p.add_argument("--csv", default="", help="write the read-out table here")
    p.add_argument("--attention-html", default="", help="with --continuation: write the attention figure here")
    p.set_defaults(fn=cmd_latents)

    p = sub.add_parser("corpus", help="mode (b) over documents: perplexity change by position with intervals, "
                       "by surprisal and token kind")
    _common_model_args(p)
    _pause_arg(p)
    from . import corpus as _corpus

    _corpus.add_cli_args(p)
    p.set_defaults(fn=cmd_corpus)

    p = sub.add_parser("info", help="the decoder, the coprocessor checkpoint, its training and evaluation")
    _common_model_args(p)
    _pause_arg(p)
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("export", help="copy a checkpoint's weights (no trainer state), e.g. in bf16 to ship")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--status", default="", help="a status line for the model card and the app")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("push", help="upload a checkpoint (weights, config, model card; never the trainer state) "
                       "to a Hugging Face Hub model repo")
    p.add_argument("dir", help="the checkpoint folder, e.g. runs/mine/last")
    p.add_argument("repo", help="the Hub repo id, user/name (created if needed)")
    p.add_argument("--revision", default="", help="a branch to push to (created if needed; default: main)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--message", default="", help="the commit message")
    p.set_defaults(fn=cmd_push)

    p = sub.add_parser("app", help="start the analysis web app")
    _common_model_args(p)
    _pause_arg(p)
    p.add_argument("--port", type=int, default=None, help="default: $GRADIO_SERVER_PORT or 7860")
    p.add_argument("--share", action="store_true")
    p.set_defaults(fn=cmd_app)

    try:
        from .eval import cli as eval_cli

        eval_cli.register_cli(sub)
    except ImportError:
        pass
    try:
        from . import data

        data.register_cli(sub)
    except ImportError:
        pass
    from . import textdata

    textdata.register_cli(sub)
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
    except ModuleNotFoundError as e:   # an optional package of an extra the install lacks
        extra = EXTRAS.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        return _fail(f"`cacheaug {args.command}` needs {e.name}, which is not installed: pip install 'cacheaug[{extra}]'")
    except Exception as e:  # training errors and the like carry their own message
        if type(e).__name__ in ("TrainingError", "DataError", "EvalError"):
            return _fail(str(e))
        raise


if __name__ == "__main__":
    sys.exit(main())
