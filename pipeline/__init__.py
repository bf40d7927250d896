"""A k-fold competition pipeline for 4x super-resolution of city satellite images.

Layers, each importing only the ones below it (docs/development.md): core, nets (with
nets/fast), accel and data, infer, train, stages (the numbered stages), tools (the commands
around them). Run any command as `python -m pipeline <command>`.
"""
