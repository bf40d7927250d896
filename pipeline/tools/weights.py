"""`python -m pipeline weights` (`make weights`): list, find, download and verify pretrained weights.

Lists every known weight file (`pipeline.core.weights.KNOWN_WEIGHTS`) and where it was found
(`SR_WEIGHTS_DIR`, then `models/pretrained/`), each checked against its published sha256;
`--fetch NAME` (or `all`) downloads what is missing from the authors' published address.
"""
from __future__ import annotations

import argparse
import sys

from pipeline.core.errors import PipelineError
from pipeline.core.weights import (
    KNOWN_WEIGHTS,
    KnownWeights,
    find_local,
    known_weights,
    resolve_weights,
    verify,
    where_searched,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fetch", nargs="+", metavar="NAME",
                        help="download these known files (or 'all') into models/pretrained/ unless found")



def _status(known: KnownWeights) -> tuple[str, str]:
    found = find_local(known.name)
    if found is None:
        return "missing", known.url or f"by hand: {known.get_it}"
    try:
        verify(found, known)
    except PipelineError:
        return "REFUSED (checksum)", str(found)
    return "ok", str(found)



def main(args: argparse.Namespace) -> int:
    failed = 0
    if args.fetch:
        # all: every file a script can download (the cloud-drive ones are listed as by hand)
        names = [w.name for w in KNOWN_WEIGHTS.values() if w.url] if args.fetch == ["all"] else args.fetch
        unknown = [n for n in names if known_weights(n) is None]
        if unknown:
            raise PipelineError(f"{unknown[0]}: unknown weights (known: {', '.join(KNOWN_WEIGHTS)})")
        for name in names:
            try:
                resolve_weights(known_weights(name).name)
            except PipelineError as exc:  # report each file, try the others
                print(f"error: {exc}", file=sys.stderr)
                failed += 1
    rows = [(w, *_status(w)) for w in KNOWN_WEIGHTS.values()]
    print(f"{'name':<12} {'net':<9} {'status':<18} where (or the address to download it from)")
    for w, status, where in rows:
        print(f"{w.name:<12} {w.net:<9} {status:<18} {where}")
    n_ok = sum(status == "ok" for _, status, _ in rows)
    print(f"{n_ok} of {len(rows)} known weight files found and verified "
          f"(searched {where_searched()}); `python -m pipeline weights --fetch NAME|all` downloads")
    return 1 if failed else 0
