"""Santurkar et al.'s probes of "does BN reduce internal covariate shift?": noisy BN (§2.1),
ICS as their Definition 2.1 (§2.2), the loss landscape along the gradient (§3.1)."""

from experiments.core.study import Study
from experiments.studies.ics import config, plots, runs

STUDIES = (
    Study("noisy_bn", run=runs.study_noisy_bn, write_outputs=plots.write_noisy,
          validate=config.validate),
    Study("ics", run=runs.study_ics, write_outputs=plots.write_ics, validate=config.validate),
    Study("landscape", run=runs.study_landscape, write_outputs=plots.write_landscape,
          validate=config.validate),
)
