"""Commands around the stages (`python -m pipeline <command>`), each a module with
`add_arguments` and `main`: predict, score, blend, ledger (lb), report, weights, demo-data,
degradation (the probe), bench, benchmark-sr, benchmark-aerial, ablation, degradation_study."""
