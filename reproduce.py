"""Run one of the paper's experiments by name, as ordinary train/test commands (see docs/reproducing.md).

    python reproduce.py main --dry_run        # every command, in order, and where each result lands
    python reproduce.py spa --gpus 4          # train, evaluate, tabulate; rerunning resumes
    python reproduce.py --demo                # the same machinery in miniature, on the CPU
    python reproduce.py coic_effect           # CoIC against the plain backbone at demo scale, paired seeds
"""
import sys

from utils.paper.runner import main

if __name__ == "__main__":
    if sys.argv[1:2] == ["coic_effect"]:
        from utils.paper.coic_effect import main as coic_effect

        raise SystemExit(coic_effect(sys.argv[2:]))
    raise SystemExit(main())
