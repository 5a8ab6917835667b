"""predictor.load_catalog against a real redis-server: the popular fallback from ratings or
implicit-event files alike."""

from __future__ import annotations

import json

import pytest

from predictor import load_catalog


@pytest.mark.parametrize("body", [
    "userID\tartistID\tweight\nu1\t007\t12\nu2\t007\t3\nu2\tb\t1\n",  # Last.fm user_artists shape
    "userId,movieId,rating,timestamp\nu1,007,4.0,1\nu2,007,2.5,2\nu2,b,5.0,3\n",
])
def test_popular_from_ratings_or_events(tmp_path, monkeypatch, redis_url, redis_client, keys, body):
    path = tmp_path / "events.txt"
    path.write_text(body)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("REDIS_PREFIX", keys.prefix)
    assert load_catalog.main(["--ratings", str(path)]) == 0
    assert json.loads(redis_client.get(keys.popular)) == [["007", 2], ["b", 1]]
