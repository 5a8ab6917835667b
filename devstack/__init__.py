"""Local infrastructure for `make up` and the tests: real redis-server, a real
Kafka-protocol broker (Tansu) and checks for Java/Spark, started on free ports.

Not a service and not part of the contract: nothing in common/ or the services imports it.
"""
