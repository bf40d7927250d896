"""`python -m pipeline lb` (`make lb`): print the submissions ledger, or record a zip's public leaderboard score.

    python -m pipeline lb                          # the ledger, with the CV-LB correlation
    python -m pipeline lb submissions/x.zip 0.81   # record the leaderboard's score of a zip

The ledger itself (`submissions/ledger.csv`, one row per zip stage 05 wrote) is
`pipeline.core.ledger`.
"""
from __future__ import annotations

import pandas as pd

from pipeline.core.errors import PipelineError
from pipeline.core.ledger import format_ledger, ledger_path, parse_score, read_ledger, record_lb


def add_arguments(parser) -> None:
    parser.add_argument("zip", nargs="?", help="submission zip (path or name in submissions/)")
    parser.add_argument("score", nargs="?", help="its public leaderboard score")



def main(args) -> int:
    if args.zip is None:
        print(format_ledger(read_ledger()))
        return 0
    if args.score is None:
        raise PipelineError(f"{args.zip}: give the score too: python -m pipeline lb ZIP SCORE")
    row, old = record_lb(args.zip, parse_score(args.score))
    was = f" (was {old:.4f})" if old is not None else ""
    cv = f", CV {row['cv']:.4f} (LB - CV {row['lb'] - row['cv']:+.4f})" if not pd.isna(row["cv"]) else ""
    print(f"lb {row['zip']}: {row['lb']:.4f}{was}{cv} -> {ledger_path()}")
    return 0
