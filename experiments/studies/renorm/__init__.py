"""Batch Renormalization, ghost batches and recomputed statistics: small normalization groups
(`renorm_groups`) and non-i.i.d. batches (`renorm_noniid`), several seeds vmapped."""

from experiments.core.study import Study
from experiments.studies.renorm import config, plots, runs

STUDIES = (
    Study("renorm_groups", run=runs.study, write_outputs=plots.write_outputs,
          validate=config.validate),
    Study("renorm_noniid", run=runs.study, write_outputs=plots.write_outputs,
          validate=config.validate),
)
