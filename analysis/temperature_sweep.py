"""Old name of :mod:`analysis.contrastive_temperature`, kept so earlier commands keep working.

It sweeps the *contrastive* temperature of the encoder's loss; the temperature of the CoI-M
kernels per layer is :mod:`analysis.modulation_temperature`.
"""
from analysis.contrastive_temperature import (COLUMNS, build_parser, checkpoint_temperature,  # noqa: F401
                                              contrastive_stats, main, run)

if __name__ == "__main__":
    raise SystemExit(main())
