"""The web page where people rate movies and watch recommendations change.

Serves a static page and a small JSON API. Writes go to Kafka (``kafka_writer``); every read
goes to the predictor's HTTP API. Never imports pyspark, redis or numpy.
"""
