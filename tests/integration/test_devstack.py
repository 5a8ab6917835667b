"""The project starts real infrastructure by itself."""

import redis
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from common.schema import parse_rating


def test_redis_server_is_real(redis_server, redis_client):
    assert redis_client.ping()
    info = redis_client.info("server")
    assert info["tcp_port"] == redis_server.extra["port"]
    assert "redis_version" in info


def test_broker_speaks_kafka(bootstrap, topic):
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for n in range(6):
        rating = parse_rating({"user": f"u{n % 2}", "item": str(n), "rating": 3.5, "timestamp": n})
        producer.send(topic, key=rating.user.encode(), value=rating.to_json_bytes()).get(10)
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    parts = [TopicPartition(topic, p) for p in range(4)]
    consumer.assign(parts)
    consumer.seek_to_beginning()
    got = []
    for _ in range(10):
        for records in consumer.poll(1000).values():
            got.extend(parse_rating(r.value) for r in records)
        if len(got) == 6:
            break
    consumer.close()
    assert sorted(r.item for r in got) == [str(n) for n in range(6)]


def test_redis_process_stop_is_clean(tmp_path):
    from devstack.services import start_redis

    proc = start_redis(workdir=tmp_path)
    client = redis.Redis.from_url(proc.url)
    assert client.ping()
    proc.stop()
    assert not proc.alive()
