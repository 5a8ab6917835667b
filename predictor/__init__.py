"""Predictor: serves predicted ratings and top-N from the factor snapshots in Redis.

Never imports pyspark. The maths lives in :mod:`predictor.model` (numpy only), Redis I/O in
:mod:`predictor.store`, HTTP in :mod:`predictor.app`.
"""
