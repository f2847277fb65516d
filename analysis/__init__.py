"""Analysis of finished studies (installed as ``bdx_study.analysis``): robust defaults and their
held-out evidence (:mod:`.robust`), the recipe they are written as (:mod:`.recipe`, with its
domain: :mod:`.domain`), reports and plots (:mod:`.report`), the detector export (:mod:`.export`)
and ``fit`` on a user's own model (:mod:`.fit`). Reads the study's Parquet tables; never imports
the trial code."""
