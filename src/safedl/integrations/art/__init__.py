"""The Adversarial Robustness Toolbox (ART, Nicolae et al. 2018, arXiv:1807.01069) as a source of components.

A profile names an ART class as ``art:ClassName`` (e.g. ``art:ProjectedGradientDescent``, ``art:SpatialSmoothing``);
:mod:`safedl.registry` hands such names to :mod:`safedl.integrations.art.resolve`, which wraps the ART class in a
safedl component of the matching kind, so it runs through the same pipeline (query counting, eps-ball checks,
adaptive evaluation through BPDA). ART is imported lazily, only when an ``art:`` name is resolved (``art`` extra).
"""
