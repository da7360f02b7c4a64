"""Concepts: conditional relevance (CRP), the concept atlas of a dataset, prototypes (PCX).

    conditional.py  ConditionalLRP: one heatmap per channel concept, K concepts in one batched backward
    engines.py      prepared engines of the concept methods, cached per model graph and options
    heaps.py        running top-N per channel (order-free, mergeable)
    atlas.py        the atlas from the per-input vectors of `concept_scores` runs: atlas.json, stats.npz
    references.py   reference grids: top-N inputs cropped to the channel's conditional heatmap
    prototypes.py   PCX: per-class Gaussian mixtures over concept-relevance vectors, outliers
    grid.py         labelled tile grids (the crp method's PNGs, the references)
    api.py          `concepts(...)`: what `xai concepts` calls

The methods `crp` and `concept_scores` are plugins (xaicli_plugins.methods.crp) built on these.
"""
