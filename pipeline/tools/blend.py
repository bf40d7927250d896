"""`python -m pipeline blend` (`make blend`): fit blend weights over experiments' out-of-fold predictions.

    models/<exp>/oof/pred_float/ of every member -> models/blends/<name>/blend.json

The fit (`pipeline.infer.blend`): greedy selection with replacement on stage 03's float
predictions, its out-of-fold CV by nested cross-validation over the training folds.
Stages 04-05 then run from the blend (`make blend-submission BLEND=<name>`).
"""
from __future__ import annotations

from pipeline.core import paths
from pipeline.core.artifacts import BLEND_JSON
from pipeline.infer.blend import WEIGHTINGS, fit_blend


def add_arguments(parser) -> None:
    parser.add_argument("--exps", nargs="+", required=True, help="experiments whose stage 03 kept OOF predictions")
    parser.add_argument("--name", required=True, help="blend name: models/blends/<name>/blend.json")
    parser.add_argument("--weights", default="fit", choices=WEIGHTINGS,
                        help="fit (default): fitted weights when they beat equal weights out of fold; "
                             "equal: equal weights always (a baseline to compare on the test)")



def main(args) -> int:
    record = fit_blend(args.exps, args.name, args.weights)
    width = max(len(e) for e in args.exps)
    print(f"blend {record['name']}: {record['n_scenes']} scenes, out-of-fold competition SSIM (TTA {record['tta']})")
    for member in record["members"]:
        print(f"  {member['exp']:<{width}}  CV {member['cv']:.4f}  weight {member['weight']:.3f} "
              f"(fitted {record['fitted_weights'][member['exp']]:.3f})")
    cv = record["cv"]
    print(f"  equal weights          CV {cv['equal']:.4f}")
    print(f"  fitted, out of fold    CV {cv['fitted_out_of_fold']:.4f} (in sample {cv['fitted_in_sample']:.4f})")
    print(f"  {record['verdict']}")
    print(f"-> {paths.blend_dir(record['name']) / BLEND_JSON} ({record['seconds']:.1f} s)")
    return 0
