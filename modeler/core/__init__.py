"""The modeler's maths, numpy only: factor tables, hashing, the replay sample and the models.

Nothing here imports Spark, Redis or Kafka, so it is tested in milliseconds and reused by
the Spark stages (:mod:`modeler.spark`) and the evaluation commands.
"""
