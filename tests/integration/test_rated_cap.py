"""The rated-item history ``{p}:rated:{user}`` and its optional cap (``MODELER_RATED_CAP``),
written through :func:`common.snapshot.write_rated` against a real redis-server, and served
by the real predictor: the exclusion list and the per-user refit work on a capped history."""

from __future__ import annotations

import numpy as np
import pytest

from common.snapshot import write_rated
from modeler.io import publish as pub
from tests.support.versions import plant, publish, serve, wait_version


def _hash(client, keys, user: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(keys.rated(user)).items()}


def _order(client, keys, user: str) -> dict[str, float]:
    return {k.decode(): s for k, s in client.zrange(keys.rated_order(user), 0, -1, withscores=True)}


def test_unbounded_history_keeps_everything_and_a_rating_wins_over_an_event(redis_client, keys) -> None:
    n = write_rated(redis_client, keys, [("u1", "a", 4.0), ("u1", "b", 2.5), ("u2", "a", 1.0)],
                    implicit=[("u1", "b", 3.0), ("u1", "c", 2.0)])
    assert n == 4  # the event on (u1, b) is dropped: a rating of the same pair wins
    write_rated(redis_client, keys, [], implicit=[("u1", "a", 9.0), ("u1", "d", 1.5)])
    write_rated(redis_client, keys, [("u1", "c", 5.0)])
    assert _hash(redis_client, keys, "u1") == {"a": "4.0", "b": "2.5", "c": "5.0", "d": pub.implicit_value(1.5)}
    assert _hash(redis_client, keys, "u2") == {"a": "1.0"}
    # No order index without a cap: the layout is the original one.
    assert not redis_client.exists(keys.rated_order("u1"))


def test_a_cap_keeps_the_newest_items_and_is_idempotent(redis_client, keys) -> None:
    cap = 5
    history = {}
    for batch in range(1, 5):  # 3 new items per batch; batch 4 re-rates i10 (dropped by then)
        rows = [("u", f"i{batch}{j}", float(j + 1)) for j in range(3)]
        if batch == 4:
            rows.append(("u", "i10", 0.5))
        for _ in range(2):  # a retried write of the same batch changes nothing
            write_rated(redis_client, keys, rows, cap=cap, order=batch)
        history.update({i: (batch, r) for _, i, r in rows})
        kept = _hash(redis_client, keys, "u")
        assert len(kept) == min(cap, len(history))
        assert set(kept) == set(_order(redis_client, keys, "u"))
    # Newest first: batch 4's four (i10 is recent again), then the greatest id of batch 3
    # (ties within a batch go by item id).
    assert _hash(redis_client, keys, "u") == {"i40": "1.0", "i41": "2.0", "i42": "3.0", "i10": "0.5", "i32": "3.0"}
    assert _order(redis_client, keys, "u") == {"i40": 4, "i41": 4, "i42": 4, "i10": 4, "i32": 3}
    # An older write (a rebuild of the history) never makes a kept item look older.
    write_rated(redis_client, keys, [("u", "i40", 1.0)], cap=cap, order=-1.0)
    assert _order(redis_client, keys, "u")["i40"] == 4
    # An implicit event is recorded (and trimmed) like a rating, a rating keeps its value.
    write_rated(redis_client, keys, [], implicit=[("u", "i41", 7.0), ("u", "e", 2.0)], cap=cap, order=5)
    kept = _hash(redis_client, keys, "u")
    assert kept["i41"] == "2.0" and kept["e"] == pub.implicit_value(2.0) and len(kept) == cap
    assert "i32" not in kept  # the oldest (batch 3, lowest id) left


def test_turning_the_cap_on_trims_an_old_history_oldest_first(redis_client, keys) -> None:
    write_rated(redis_client, keys, [("u", f"old{j:02d}", 3.0) for j in range(40)])  # no cap yet
    write_rated(redis_client, keys, [("u", "new", 5.0)], cap=10, order=7)
    kept = _hash(redis_client, keys, "u")
    # Entries written without a cap count as the oldest; among them the id order decides.
    assert set(kept) == {"new", *(f"old{j:02d}" for j in range(31, 40))}
    assert _order(redis_client, keys, "u")["new"] == 7


def test_write_partition_caps_by_the_segment_it_writes(redis_url, redis_client, keys) -> None:
    for segment in (1, 2, 3):
        rec = (pub.RATED, ["u"] * 2, [f"s{segment}a", f"s{segment}b"], [4.0, 3.0], ["u"], [f"s{segment}e"], [1.0])
        written, _, _ = next(pub.write_partition([rec], redis_url, keys.prefix, segment,
                                                 rated_cap=4))
        assert written == 0  # rated entries are not factor rows (the full-or-delta rule's measure)
    kept = _hash(redis_client, keys, "u")
    assert set(kept) == {"s3a", "s3b", "s3e", "s2e"}
    assert set(_order(redis_client, keys, "u").values()) == {2.0, 3.0}


def test_the_predictor_excludes_and_refits_from_a_capped_history(redis_url, redis_client, keys) -> None:
    cap = 12
    both = plant()
    publish(redis_client, keys, both, 1)  # 25 rated items per user, uncapped
    k = 4
    user = both.users[k]
    # The modeler learns two more ratings of u4 with the cap on: 12 newest items stay.
    fresh = [i for i in both.items if i not in both.rated[user]][:2]
    write_rated(redis_client, keys, [(user, fresh[0], 5.0), (user, fresh[1], 4.5)], cap=cap, order=2)
    kept = {i: float(v) for i, v in _hash(redis_client, keys, user).items()}
    assert len(kept) == cap and set(fresh) <= set(kept)
    both.rated[user] = kept
    with serve(redis_url, keys) as api:
        wait_version(api, 1)
        body = api.get(f"/v1/users/{user}/recommendations?n=10").json()
    refit = both.refit(k)
    items = [x["item"] for x in body["items"]]
    # Served: the user folded in from the capped history, its items excluded.
    assert items == both.ranked(k, 10, refit)
    assert not set(items) & set(kept)
    assert body["items"][0]["score"] == pytest.approx(
        float(both.y.astype(np.float64)[both.items.index(items[0])] @ refit), abs=1e-4)


@pytest.mark.spark
def test_the_modeler_caps_histories_and_still_learns_every_rating(spark, bootstrap, topic, redis_url, redis_prefix,
                                                                 ml_small) -> None:
    import redis

    from modeler.replay import make_producer, send_rows
    from modeler.service import ModelerService
    from tests.support.modeler import assert_complete_once, ml_rows, run_until_seen, settings_for

    rows = ml_rows(ml_small, 900)
    producer = make_producer(bootstrap)
    send_rows(producer, topic, rows)
    producer.flush()
    producer.close()
    cap = 8
    settings = settings_for(bootstrap, topic, redis_url, redis_prefix, MODELER_BATCH_MAX_RECORDS=300,
                            MODEL_NUM_PARTITIONS=1, MODELER_RATED_CAP=cap)
    assert settings.rated_cap == cap
    service = ModelerService(settings, spark=spark)
    run_until_seen(service, len(rows))
    client = redis.Redis.from_url(redis_url)
    # The model is complete and counts every rating once: the cap only bounds the history.
    assert_complete_once(client, redis_prefix, rows)
    version = service.version
    by_user: dict[str, list[str]] = {}
    for u, i, _, _ in rows:
        by_user.setdefault(u, []).append(i)
    heavy = [u for u, items in by_user.items() if len(set(items)) > cap]
    assert heavy  # the test needs users the cap trims
    for user, items in by_user.items():
        kept = {k.decode() for k in client.hkeys(f"{redis_prefix}:rated:{user}")}
        order = {k.decode(): s for k, s in client.zrange(f"{redis_prefix}:rated_order:{user}", 0, -1,
                                                          withscores=True)}
        assert kept == set(order) and len(kept) == min(cap, len(set(items)))
        assert kept <= set(items)
        # Recency is the version that wrote the item; the user's last rating is in the newest batch.
        assert all(1 <= s <= version for s in order.values())
        assert order.get(items[-1], max(order.values())) == max(order.values())
