"""The rubric-reward microservice: LongTraceRL's outcome + entity rubric reward as an HTTP API (`app.py`) and a
stream worker (`worker.py`) between `rollouts` and `scored`. Formulas: `rubric.py`, `combine.py`."""
