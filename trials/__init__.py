"""Trial code that Ray Tune runs (installed as ``bdx_study.trials``).

- :mod:`.launch`: runs or resumes a study, as named steps over the modules below;
- :mod:`.resume`, :mod:`.lock`, :mod:`.cluster`: start or resume, the study's lock, Ray;
- :mod:`.parent_run` and :mod:`.tracking`: the driver-side MLflow parent run and callback (a
  nested run per trial and per victim);
- :mod:`.victim_stage`: trains the study's missing victims as Ray tasks before the sweep;
- :mod:`.tuner` and :mod:`.search`: Tune's search over the families (one Optuna study each);
- :mod:`.trainable`: one trial = one family config evaluated against every victim of the study;
- :mod:`.followups` and :mod:`.nested_folds`: lost trials again, refits, held-out folds.
"""
