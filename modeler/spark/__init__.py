"""The modeler's Spark layer: the one SparkSession and the RDD stages of the streaming models.

Imports :mod:`modeler.core` for the maths, never :mod:`modeler.io` or the service.
"""

from modeler.spark.session import default_model_partitions, get_spark

__all__ = ["default_model_partitions", "get_spark"]
