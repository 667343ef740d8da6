"""Ghorbani, Krishnan and Xiao's Hessian studies (ICML 2019): does BN remove the Hessian's
outliers, and does the gradient stop concentrating in their eigenspace?"""

from experiments.core.study import Study
from experiments.studies.hessian import config, plots, runs

STUDIES = (
    Study("hessian_spectrum", run=runs.study_spectrum, write_outputs=plots.write_spectrum,
          validate=config.validate),
    Study("hessian_population", run=runs.study_population,
          write_outputs=plots.write_population, validate=config.validate),
    Study("hessian_agreement", run=runs.study_agreement, write_outputs=plots.write_agreement,
          validate=config.validate),
)
