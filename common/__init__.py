"""The contract between the services: rating schema, settings, Redis layout, codec, readers.

Imports nothing from the services (modeler, predictor, frontend) and never pyspark.
"""
