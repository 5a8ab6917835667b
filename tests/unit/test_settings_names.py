"""Settings names: the naming rule, renamed settings still read for one release with a warning,
and the README's one configuration table listing every setting."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from common.settings import CommonSettings, SettingName, setting_names
from frontend.config import FrontendSettings
from modeler.config import ModelerSettings
from predictor.config import PredictorSettings

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {"modeler": ModelerSettings, "predictor": PredictorSettings, "frontend": FrontendSettings}
SHARED = {s.name for s in setting_names(CommonSettings)}
# The event contract's cap and the predictor's address keep names that are not the reader's.
CONVENTIONAL = {"modeler": {"EVENT_MAX_WEIGHT"}, "frontend": {"PREDICTOR_URL"}}


def _renamed() -> list[tuple[type[CommonSettings], SettingName]]:
    return [(cls, s) for cls in SERVICES.values() for s in setting_names(cls) if s.deprecated]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for _cls, s in _renamed():
        for name in (s.name, *s.deprecated):
            monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "common.settings" and r.levelno == logging.WARNING]


def test_every_setting_follows_the_naming_rule() -> None:
    for service, cls in SERVICES.items():
        for s in setting_names(cls):
            ok = (s.name in SHARED or s.name in CONVENTIONAL.get(service, set())
                  or s.name.startswith(f"{service.upper()}_")
                  or (service == "modeler" and s.name.startswith("MODEL_")))
            assert ok, f"{service}: {s.name} breaks the naming rule (common/settings.py)"


@pytest.mark.parametrize(("cls", "setting"), _renamed(),
                         ids=lambda v: v.name if isinstance(v, SettingName) else v.__name__)
def test_an_old_name_in_the_environment_is_read_with_a_warning(
        clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        cls: type[CommonSettings], setting: SettingName) -> None:
    default = cls.model_fields[setting.field].default
    # A valid value other than the default, of the field's type (the unset ones are paths/tokens).
    value: object = default + 1 if isinstance(default, (int, float)) else "/tmp/x"
    clean_env.setenv(setting.deprecated[0], str(value))
    with caplog.at_level(logging.WARNING, logger="common.settings"):
        got = getattr(cls(), setting.field)
    assert got == value != default
    assert [m for m in _warnings(caplog) if setting.deprecated[0] in m and f"use {setting.name}" in m]


def test_the_new_name_reads_without_a_warning(clean_env: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    clean_env.setenv("MODELER_BATCH_MAX_RECORDS", "77")
    with caplog.at_level(logging.WARNING, logger="common.settings"):
        assert ModelerSettings().batch_max_records == 77
    assert _warnings(caplog) == []


def test_the_new_name_wins_over_the_old_and_the_old_is_said_to_be_ignored(
        clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    clean_env.setenv("PREDICTION_TTL_S", "10")
    clean_env.setenv("PREDICTOR_PREDICTION_TTL_S", "20")
    with caplog.at_level(logging.WARNING, logger="common.settings"):
        assert PredictorSettings().prediction_ttl_s == 20
    assert any("PREDICTION_TTL_S is deprecated and ignored" in m for m in _warnings(caplog))


def test_an_old_name_passed_as_an_argument_is_read_with_a_warning(
        clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="common.settings"):
        assert FrontendSettings(WRITE_TOKEN="s3cret").write_token == "s3cret"
    assert any("WRITE_TOKEN" in m and "use FRONTEND_WRITE_TOKEN" in m for m in _warnings(caplog))


def test_an_old_name_still_validates_its_value(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("KEEP_VERSIONS", "1")  # ge=2
    with pytest.raises(ValueError, match="MODELER_KEEP_VERSIONS"):
        ModelerSettings()


def _readme_configuration() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Configuration\n")
    return text[start:text.index("\n## ", start + 1)]


def test_the_readme_table_lists_every_setting_and_every_old_name() -> None:
    section = _readme_configuration()
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    in_table = {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[1])}
    names = SHARED | {s.name for cls in SERVICES.values() for s in setting_names(cls)}
    assert names - in_table == set(), "settings missing from the README table"
    # Names in the table that are not fields are read by our code from os.environ (Spark session).
    session = (ROOT / "modeler" / "spark" / "session.py").read_text(encoding="utf-8")
    read_directly = set(re.findall(r"""os\.environ\.get\("([A-Z_]+)\"""", session))
    assert in_table - names - read_directly == set(), "README table rows read by nothing"
    renamed = section[section.index("**Renamed settings.**"):]
    old = {o for _cls, s in _renamed() for o in s.deprecated}
    assert {o for o in old if f"`{o}`" not in renamed} == set(), "old names missing from the README"
