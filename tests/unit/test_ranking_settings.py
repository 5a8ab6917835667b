"""MODEL_RANKING_* settings map onto ALSParams, the one source of the ranking defaults."""

from __future__ import annotations

import pytest

from common.feedback import Weighting
from modeler.config import ModelerSettings
from modeler.core.als_math import ALSParams
from modeler.service import model_params, ranking_meta, version_models
from modeler.spark.streaming_als import StreamingALS


def test_unset_settings_keep_the_alsparams_defaults():
    model = StreamingALS(**model_params(ModelerSettings()))
    defaults = ALSParams()
    for name in ("ranking", "ranking_rank", "ranking_alpha", "ranking_reg_param",
                 "ranking_replay_ratio", "ranking_history", "ranking_sweep", "weighting"):
        assert getattr(model.params, name) == getattr(defaults, name)


def test_ranking_settings_reach_the_model_and_the_version_metadata():
    s = ModelerSettings(MODEL_RANKING_RANK=7, MODEL_RANKING_ALPHA=3.5, MODEL_RANKING_REG_PARAM=0.2,
                        MODEL_RANKING_LIKED=0.5, MODEL_RANKING_IMPLICIT="linear",
                        MODEL_RANKING_PROBE_SIZE=0, MODEL_RANKING_HISTORY=32, MODEL_RANKING_SWEEP=1.5,
                        EVENT_MAX_WEIGHT=50)
    model = StreamingALS(**model_params(s))
    p = model.params
    assert (p.ranking_rank, p.ranking_alpha, p.ranking_reg_param, p.ranking_probe_size) == (7, 3.5, 0.2, 0)
    assert (p.ranking_history, p.ranking_sweep) == (32, 1.5)
    assert p.weighting == Weighting(liked=0.5, implicit="linear")
    assert s.event_max_weight == 50
    assert version_models(model) == ("explicit",)  # nothing learned yet
    model.positives_seen = 3
    assert version_models(model) == ("ranking",)
    meta = ranking_meta(model, version_models(model))
    assert meta["ranking_rank"] == 7 and meta["ranking_weighting"]["liked"] == 0.5
    # A stored parameter set round-trips (the weighting comes back from its dict).
    assert ALSParams(**p.to_dict()) == p


def test_bad_ranking_parameters_are_refused_by_name():
    with pytest.raises(ValueError, match="ranking_replay_scope"):
        ALSParams(ranking_replay_scope="some")
    with pytest.raises(TypeError, match="unknown StreamingALS arguments"):
        StreamingALS(ranking_rnak=3)
    with pytest.raises(Exception, match="MODEL_RANKING_ALPHA"):
        ModelerSettings(MODEL_RANKING_ALPHA=-1)
