"""SWE environments: SWE-bench-style tasks (`task`), the agent's tools (`tools`), the repository
in a sandbox (`workspace`), the multi-turn environment (`env`), and offline task building from
PyPI sdists (`build`). Grading lives in `reward.swe`. See docs/swe.md."""
