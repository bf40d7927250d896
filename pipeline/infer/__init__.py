"""Inference: one function for every prediction, and what it needs.

ensemble (`predict_scene`: nets x TTA views averaged in float, rounded once), tta, tiling,
precision (which precision runs, for inference and training alike), load (the nets of a
checkpoint, an experiment or a blend), blend (fitting blend weights), oof (out-of-fold scoring).
"""
