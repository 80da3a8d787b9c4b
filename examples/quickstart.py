"""Quickstart: load a decoder and a coprocessor, augment, score, plot. Run it as a script or cell
by cell (`# %%` cells in VS Code / Jupytext); CPU is enough for the default models.

    python examples/quickstart.py                                   # embedded SmolLM2 + shipped coprocessor
    python examples/quickstart.py --coprocessor user/repo --out /tmp/qs   # a coprocessor from the Hub
    python examples/quickstart.py --decoder path/to/decoder --coprocessor runs/mine/last

Writes two figures (standalone HTML) to --out and prints the tables the app shows.
"""

# %% Settings
import argparse
from pathlib import Path

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--decoder", default=None, help="a transformers folder or Hub id (default: the embedded SmolLM2)")
ap.add_argument("--coprocessor", default=None, help="a checkpoint folder or Hub id (default: the shipped one)")
ap.add_argument("--out", default="quickstart_out", help="folder for the figures")
ap.add_argument("--max-new-tokens", type=int, default=32)
args = ap.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

PROMPT = "Why is the sky blue?"
TEXT = ("The sky looks blue because air molecules scatter short wavelengths of sunlight more strongly "
        "than long ones. At sunset the light crosses more air, so the blue is scattered away and the "
        "sky turns red and orange.")

# %% 1. Load: a frozen decoder and a coprocessor that reads its KV cache
from cacheaug_core import viz
from cacheaug_core.viz import app_views
from cacheaug_core.workbench import Workbench

wb = Workbench.load(args.decoder, args.coprocessor)
print(f"decoder {wb.info.name}; coprocessor {wb.coprocessor_source} "
      f"({wb.coprocessor.config.num_latents} latents)")
if wb.notice:
    print("note:", wb.notice)

# %% 2. Augment: the latents the coprocessor appends to the cache at the end of the prompt
lat = wb.latents([PROMPT], top_k=3)
print(f"latents: {tuple(lat['latents'].shape)} (num_latents, hidden); each read through the LM head:")
for i, toks in enumerate(lat["top_tokens"][:4]):
    print(f"  latent {i}: {[viz.clean_token(t) for t in toks]}")
pca = viz.latent_pca_figure(lat["latents"], lat["prompt_ids"], lat["latent_index"], labels=lat["labels"])
(out / "latents_pca.html").write_text(viz.figure_to_html(pca), encoding="utf-8")

# %% 3. Score, mode (a): latents inserted once; every later token's loss with and without them
once = wb.score_text(TEXT, with_attention=False)
print(f"\naugmented after token {once['point']}:")
print(viz.summary_table(once["nll_base"], once["nll_aug"]).to_string(index=False))

# %% 4. Score, mode (b): latents after every token, the n-th token ahead scored (the paper's protocol)
every = wb.score_every(TEXT, positions=8)
by_pos = app_views.by_position_every(every["nll_base"], every["nll_aug"])
print("\nmean NLL by position ahead:")
print(by_pos.to_string(index=False, float_format=lambda x: f"{x:.4f}"))

# %% 5. Plot: perplexity change by position ahead
fig = viz.delta_by_position_figure(by_pos, title="Perplexity change by position ahead")
(out / "delta_by_position.html").write_text(viz.figure_to_html(fig), encoding="utf-8")

# %% 6. Generate with and without augmentation, same (greedy) sampling
final = None
for final in wb.generate_pair(PROMPT, max_new_tokens=args.max_new_tokens, temperature=0.0):
    pass
for name, arm in final.items():
    print(f"\n=== {name}\n{arm.text}")
print(f"\nfigures: {out / 'latents_pca.html'}, {out / 'delta_by_position.html'}")
