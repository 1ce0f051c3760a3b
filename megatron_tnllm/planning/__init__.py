"""Planners for pretraining layouts: peak GPU memory (:mod:`.memory`) and step time (:mod:`.step`).

Command lines: ``python tools/plan_memory.py`` and ``python tools/plan_step.py``.
"""
