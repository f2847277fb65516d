"""Study files shipped with bdx-study (installed as bdx_study.search_spaces)."""
