"""Experiment configs as code (ml_collections), loaded by path with ``--config=configs/NAME.py``;
shared defaults in ``configs/default.py`` (``from configs import default``)."""
