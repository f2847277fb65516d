"""Analysis of finished studies (installed as ``bdx_study.analysis``): robust defaults and their
held-out evidence (:mod:`.robust`), reports and plots (:mod:`.report`), and the detector export
(:mod:`.export`). Reads the study's Parquet tables; never imports the trial code."""
