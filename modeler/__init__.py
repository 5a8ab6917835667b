"""The modeler: Kafka rating stream -> streaming ALS on Spark RDDs -> factor snapshots in Redis."""
