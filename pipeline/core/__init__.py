"""The bottom layer: what every other part uses, and nothing of theirs.

errors (one-line PipelineError), paths (every artifact's path), config (strict YAML with
`base:` and `--set`), io (images, atomic writes), locks (one writer per artifact), checkpoints,
metrics (the competition SSIM), weights (pretrained files), and the readers of the stages'
artifacts (artifacts, ledger).
"""
