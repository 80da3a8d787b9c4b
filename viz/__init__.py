"""Plotting and table helpers for cacheaug: plain data in, plotly figures / HTML / DataFrames out.

Nothing in this package imports torch or runs a model, so the Gradio app, the
CLI and notebooks can all call the same functions on numpy arrays::

    from cacheaug_core import viz
    html = viz.token_delta_html(tokens, nll_aug - nll_base, nll_base, nll_aug)
    table = viz.summary_table(nll_base, nll_aug)
    fig = viz.delta_by_position_figure(by_position_df)
    open("fig.html", "w").write(viz.figure_to_html(fig))

Sign convention throughout: delta = NLL(decoder+coprocessor) − NLL(decoder);
negative = the coprocessor's latents lower loss/perplexity (helps, blue),
positive = raise it (hurts, red).
"""

from .figures import (
    attention_to_latents_figure,
    delta_by_position_figure,
    delta_heatmap_figure,
    entropy,
    figure_to_html,
    fit_small_screens,
    frame_to_csv,
    kl_divergence,
    per_token_frame,
    summary_table,
    topk_compare_frame,
    topk_frame,
)
from .latents import (fit_latent_axes, latent_pca, latent_pca_figure, latent_readout_frame, latent_similarity,
                      latent_similarity_figure, project_latents)
from .tokens import clean_token, display_token, plotly_text, token_delta_html

__all__ = [
    "attention_to_latents_figure",
    "clean_token",
    "delta_by_position_figure",
    "delta_heatmap_figure",
    "display_token",
    "entropy",
    "figure_to_html",
    "fit_latent_axes",
    "fit_small_screens",
    "frame_to_csv",
    "kl_divergence",
    "latent_pca",
    "latent_pca_figure",
    "latent_readout_frame",
    "latent_similarity",
    "latent_similarity_figure",
    "per_token_frame",
    "plotly_text",
    "project_latents",
    "summary_table",
    "token_delta_html",
    "topk_compare_frame",
    "topk_frame",
]
