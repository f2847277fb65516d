"""Trial code that Ray Tune runs (installed as ``bdx_study.trials``).

- :mod:`.trainable`: one trial = one BaDExpert config evaluated against every victim of the study;
- :mod:`.victim_stage`: trains the study's missing victims as Ray tasks before the sweep;
- :mod:`.tracking`: the driver-side MLflow callback (one parent run per study, a nested run
  per trial and per victim);
- :mod:`.launch`: builds the Tuner (OptunaSearch, resources, storage) and runs or resumes a study.
"""
