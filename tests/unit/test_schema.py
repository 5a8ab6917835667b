import json
import math

import pytest

from common.schema import MAX_ID_LENGTH, InvalidRating, RatingScale, parse_rating

GOOD = {"user": "42", "item": "1193", "rating": 4.5, "timestamp": 978300760}


def test_valid_rating_roundtrips_through_json():
    r = parse_rating(GOOD)
    assert (r.user, r.item, r.rating, r.timestamp) == ("42", "1193", 4.5, 978300760)
    assert parse_rating(r.to_json_bytes()) == r


def test_integer_ids_become_strings_and_uuids_work():
    assert parse_rating({**GOOD, "user": 7, "item": 9}).user == "7"
    uid = "0b8f6c3e-3a8e-4d5c-9d59-2f3c1e2b7a10"
    assert parse_rating({**GOOD, "user": uid}).user == uid


def test_timestamp_defaults_to_now():
    data = dict(GOOD)
    del data["timestamp"]
    assert parse_rating(data).timestamp > 1_600_000_000


@pytest.mark.parametrize(
    ("patch", "field", "reason"),
    [
        ({"user": None}, "user", ""),
        ({"rating": "four"}, "rating", "number"),
        ({"rating": math.nan}, "rating", "finite"),
        ({"rating": math.inf}, "rating", "finite"),
        ({"rating": 5.5}, "rating", "between 0.5 and 5.0"),
        ({"rating": 0.0}, "rating", "between 0.5 and 5.0"),
        ({"user": ""}, "user", "at least 1"),
        ({"item": "   "}, "item", "at least 1"),
        ({"item": "x" * (MAX_ID_LENGTH + 1)}, "item", f"at most {MAX_ID_LENGTH}"),
        ({"rating": True}, "rating", "boolean"),
        ({"timestamp": -5}, "timestamp", "greater than or equal"),
    ],
)
def test_bad_fields_name_the_field_and_reason(patch, field, reason):
    data = {**GOOD, **patch}
    if patch.get("user", 1) is None:
        del data["user"]
    with pytest.raises(InvalidRating) as err:
        parse_rating(data)
    assert err.value.reason.startswith(f"{field}:")
    assert reason in err.value.reason


def test_missing_field_is_named():
    with pytest.raises(InvalidRating, match=r"^item: Field required"):
        parse_rating({"user": "1", "rating": 3.0})


def test_bad_json_is_an_invalid_rating_not_a_crash():
    with pytest.raises(InvalidRating, match="JSON"):
        parse_rating(b"{not json")
    with pytest.raises(InvalidRating, match="rating: must be a finite number"):
        parse_rating(b'{"user":"1","item":"2","rating":NaN}')


def test_configurable_scale():
    scale = RatingScale(min=1, max=10)
    assert parse_rating({**GOOD, "rating": 9}, scale).rating == 9
    with pytest.raises(InvalidRating, match=r"between 1\.0 and 10\.0"):
        parse_rating({**GOOD, "rating": 0.5}, scale)
    assert scale.clip(11.2) == 10 and scale.clip(-3) == 1


def test_wire_format_is_plain_json():
    assert json.loads(parse_rating(GOOD).to_json_bytes()) == GOOD
