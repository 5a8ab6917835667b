"""The service's side of the online search without services: settings mapped onto the search
and the model parameters, a candidate rebuilt from what is stored of it, and the publish
chunks (the leader's served rows, every live candidate's restore rows)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from pydantic import ValidationError

from common.synthetic import generate
from modeler.config import ModelerSettings
from modeler.core.als_math import ALSParams, LocalStreamingALS
from modeler.core.search import SearchSettings
from modeler.io import publish as pub
from modeler.search_service import _chunks, base_params, search_kind, search_settings
from modeler.spark.side_by_side import Rows, rebuild_candidate, resume_scalars


def test_bad_candidates_fail_at_start_up_naming_the_field() -> None:
    for raw, words in (('[{"rank": 0}]', "MODEL_CANDIDATES[0].rank"), ("[{rank: 1}]", "not valid JSON"),
                       ('[{"rnk": 3}]', "unknown parameter"), ('[{"rank": 3}, {"rank": 3}]', "duplicate")):
        with pytest.raises(ValidationError) as err:
            ModelerSettings(MODEL_CANDIDATES=raw)
        assert "MODEL_CANDIDATES" in str(err.value) and words in str(err.value), raw
    assert ModelerSettings(MODEL_CANDIDATES="  ").model_candidates is None
    assert ModelerSettings().model_candidates is None


def test_search_settings_map_onto_one_source_of_defaults() -> None:
    s = ModelerSettings(MODEL_CANDIDATES='[{"rank": 3}]')
    got = search_settings(s, [{"rank": 3}])
    assert got == SearchSettings(metric="rmse")  # unset: SearchSettings' own defaults
    s = ModelerSettings(MODEL_CANDIDATES='[{"ranking_alpha": 3}]', MODEL_SEARCH_BUDGET=700, MODEL_SEARCH_ETA=3,
                        MODEL_SEARCH_PATIENCE=4, MODEL_SEARCH_SWITCH_MARGIN=0, MODEL_SEARCH_RESPAWN=False,
                        MODEL_SEARCH_MIN_EVENTS=0, MODEL_SEED=9)
    got = search_settings(s, [{"ranking_alpha": 3.0}])
    assert got.metric == "ndcg@10" and search_kind(got.metric) == "ranking"
    assert (got.schedule.budget, got.schedule.eta, got.patience, got.switch_margin, got.respawn, got.min_events,
            got.seed) == (700, 3.0, 4, 0.0, False, 0, 9)
    with pytest.raises(ValidationError, match="MODEL_SEARCH_ETA"):
        ModelerSettings(MODEL_SEARCH_ETA=1.0)
    # The candidates' base is the model settings on ALSParams, in the one-partition layout.
    base = base_params(ModelerSettings(MODEL_RANK=7, MODEL_RANKING_ALPHA=5.0, MODEL_NUM_PARTITIONS=4))
    assert (base.rank, base.ranking_alpha, base.num_partitions) == (7, 5.0, 1)
    assert base.reg_bias == base.reg_param  # StreamingALS's mapping, not a second default


def _trained(params: ALSParams, batches: int = 4) -> tuple[LocalStreamingALS, list]:
    rows = [tuple(r) for r in generate(n_users=80, n_items=120, n_ratings=batches * 300 + 300, seed=3)[0]]
    m = LocalStreamingALS(params)
    for b in range(batches):
        m.train(rows[b * 300:(b + 1) * 300])
    return m, rows[batches * 300:]


def _rows(t, ranking: bool = False) -> Rows:
    return Rows(list(t.ids), np.zeros(len(t.ids), np.float32) if ranking else t.bias.copy(), t.vec.copy(),
                t.count.copy())


def test_a_candidate_rebuilt_from_its_rows_and_scalars_predicts_as_before() -> None:
    p = ALSParams(num_partitions=1, rank=4, ranking_rank=3, reservoir_size=500)
    m, rest = _trained(p)
    # The scalars travel as JSON (no pickle): what the version's search_state holds.
    scalars = json.loads(json.dumps(resume_scalars(m)))
    r = rebuild_candidate(dataclasses.replace(p), scalars, _rows(m.users), _rows(m.items),
                          _rows(m.ranking.users, True), _rows(m.ranking.items, True))
    users, items = [x[0] for x in rest[:80]], [x[1] for x in rest[:80]]
    np.testing.assert_allclose(r.predict(users, items), m.predict(users, items), atol=1e-6)
    assert (r.mu, r.ratings_seen, r.batches, r.rating_sum) == (m.mu, m.ratings_seen, m.batches, m.rating_sum)
    assert r.ranking.positives_seen == m.ranking.positives_seen > 0
    u = m.ranking.users.ids[0]
    assert r.ranking.recommend(u, 10, exclude_seen=False) == m.ranking.recommend(u, 10, exclude_seen=False)
    # Gramians: XᵀX recomputed from the rows equals the carried one (up to float32 rounding).
    np.testing.assert_allclose(r.ranking.gram_users, m.ranking.gram_users, rtol=1e-4, atol=1e-5)
    # Seeded statistics: each row's ridge solution is its current vector.
    assert (r.users.mass[r.users.count > 0] > 0).all()
    # It learns on: one more batch moves it like the original, not identically (seeded
    # statistics and an empty replay sample, as for the served model's restore).
    m.train(rest)
    r.train(rest)
    diff = np.abs(r.predict(users, items) - m.predict(users, items))
    assert 0 < diff.max() < 0.5


def test_publish_chunks_hold_the_leader_served_and_every_live_candidate() -> None:
    p = ALSParams(num_partitions=1, rank=3, ranking_rank=2, reservoir_size=200)
    a, _ = _trained(p, 2)
    b, _ = _trained(dataclasses.replace(p, rank=5), 2)
    models = {"c0": a, "c1": b}
    full = list(_chunks("c1", ["c0", "c1", "c9"], True)(models))
    served = [c for c in full if c[0] != pub.SEARCH]
    # The leader's tables as the served factor sets: items before users, rank 5.
    assert [c[0] for c in served] == [pub.RANKING_ITEM, pub.ITEM, pub.RANKING_USER, pub.USER]
    assert served[1][3].shape == (len(b.items), 5) and served[1][1] == b.items.ids
    search = {(c[1], c[2]): c for c in full if c[0] == pub.SEARCH}
    assert set(search) == {(cid, k) for cid in ("c0", "c1")
                           for k in ("users", "items", "ranking_users", "ranking_items")}  # c9: no model yet
    assert search[("c0", "users")][5].shape == (len(a.users), 3)
    np.testing.assert_array_equal(search[("c0", "items")][6], a.items.count)
    # A delta: only the rows the last batch changed.
    delta = list(_chunks("c1", ["c0", "c1"], False)(models))
    n_touched = int(a.users.touched.sum())
    assert 0 < n_touched < len(a.users)
    assert len(next(c for c in delta if c[:3] == (pub.SEARCH, "c0", "users"))[3]) == n_touched
