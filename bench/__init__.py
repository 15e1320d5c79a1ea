"""``python -m bench`` (from a checkout): how fast the backend is, as ratios.

Every headline figure is a ratio against a reference measured in the same run
(SAM ViT-B, the LS SDK's RLE encoder, raw masks, torch), printed next to the
absolute numbers and the machine they were measured on. Sections (one module
each): ``cold``, ``warm`` (+ ``warm_baselines``, ``warm_profile``), ``rle``,
``cache``, ``throughput``, ``onnx``, ``queue`` (warm jobs on worker processes), ``load`` (cached
clicks from 8 clients), ``burst`` (peak RSS under cold 12 MP images), and for issue #16
``mobilesam`` (the CPU peer), ``int8``, ``clicks`` (8 concurrent clients vs the base commit), and
for issue #25 ``defaults`` (FastSAM-s@1024 + CLIP ViT-B-32: click, text, labelled pre-annotation, warm job);
``runner`` runs them, ``report`` prints.
Modes: ``smoke`` (tests, < 60 s), ``quick`` (< 5 min on 2 cores), ``full``.
"""

from .runner import DEFAULT_OUT, SECTIONS, run_bench

__all__ = ["DEFAULT_OUT", "SECTIONS", "run_bench"]
