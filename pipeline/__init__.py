"""A k-fold competition pipeline for 4x super-resolution of city satellite images.

Stages live in `pipeline.stages` (one module each), nets in `pipeline.nets`, and the
shared pieces (io, data, losses, metrics, tta, tiling, weights, demo data) each in one
module here. Run any command as `python -m pipeline <command>`.
"""
