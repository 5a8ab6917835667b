"""The top-N batcher: concurrent requests share products, on the worker thread or inline,
and every request gets what :func:`predictor.model.recommend` gives it alone."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from common.feedback import Weighting
from predictor.batcher import TopNBatcher
from predictor.model import BY_RANKING, BY_RATING, FactorModel, RankingSet, recommend


def model(n_items: int = 6000, rank: int = 8, seed: int = 0) -> FactorModel:
    rng = np.random.default_rng(seed)
    ranking = RankingSet.build(rng.normal(0, 0.5, (n_items, rank)), reg_param=0.05, alpha=1.0,
                               weighting=Weighting())
    return FactorModel.build(
        item_ids=[f"i{k}" for k in range(n_items)], item_bias=rng.normal(0, 0.3, n_items),
        item_factors=rng.normal(0, 0.5, (n_items, rank)), version=1, rank=rank, mu=3.5, ranking=ranking,
    )


@pytest.mark.parametrize("threaded", [True, False])
def test_batched_lists_and_ratings_are_each_users_own(threaded: bool) -> None:
    m = model()
    rng = np.random.default_rng(1)
    users = [(float(rng.normal()), rng.normal(0, 0.5, m.rank).astype(np.float32),
              rng.normal(0, 0.5, m.rank).astype(np.float32), int(n),
              rng.choice(m.n_items, 20, replace=False) if k % 2 else None)
             for k, n in enumerate([10, 3, 10, 50, 1, 10, 10, 7] * 3)]
    sizes: list[int] = []
    batcher = TopNBatcher(max_wait=0.001, max_batch=5, on_batch=sizes.append, threaded=threaded)

    async def run() -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        first = [batcher.submit(m, b, x, n, ex, BY_RANKING, (b, u)) for b, u, x, n, ex in users[:12]]
        await asyncio.sleep(0)  # the first batch starts; the rest arrive while it runs
        rest = [batcher.submit(m, b, u, n, ex, BY_RATING) for b, u, _, n, ex in users[12:]]
        return list(await asyncio.gather(*first, *rest))

    try:
        results = asyncio.run(run())
    finally:
        batcher.close()
    assert sum(sizes) == len(users) and max(sizes) <= 5 and len(sizes) < len(users)
    for k, ((b, u, x, n, ex), (rows, scores, ratings)) in enumerate(zip(users, results, strict=True)):
        by_ranking = k < 12
        one_rows, one_scores = recommend(m, b, x if by_ranking else u, n, exclude=ex,
                                         by=BY_RANKING if by_ranking else BY_RATING)
        assert rows.tolist() == one_rows.tolist()
        assert np.allclose(scores, one_scores, atol=1e-5)
        assert ratings is not None
        assert np.allclose(ratings, m.predict_rows(b, u, rows), atol=1e-5)


def test_a_failing_product_fails_its_requests_only() -> None:
    m = model(n_items=500)
    no_ranking = FactorModel.build(item_ids=m.item_ids, item_bias=m.item_bias, item_factors=m.item_factors,
                                   version=2, rank=m.rank, mu=3.5)
    batcher = TopNBatcher(max_wait=0.0)
    x = np.ones(m.rank, np.float32)

    async def run() -> list[object]:
        jobs = [batcher.submit(no_ranking, 0.0, x, 10, None, BY_RANKING, None),
                batcher.submit(m, 0.0, x, 10, None, BY_RANKING, None)]
        return list(await asyncio.gather(*jobs, return_exceptions=True))

    try:
        failed, ok = asyncio.run(run())
    finally:
        batcher.close()
    assert isinstance(failed, ValueError)
    assert isinstance(ok, tuple) and len(ok[0]) == 10 and ok[2] is None
