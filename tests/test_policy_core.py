"""Policy core pieces that need no engine: the per-version prompt style."""

import json

from policy_svc.core import model_few_shot


def test_fine_tuned_version_turns_few_shot_off(tmp_path):
    assert model_few_shot(tmp_path, True) is True  # no metadata: the service default
    (tmp_path / "rstar_model.json").write_text(json.dumps({"few_shot": False}))
    assert model_few_shot(tmp_path, True) is False


def test_unreadable_or_odd_metadata_keeps_the_default(tmp_path):
    (tmp_path / "rstar_model.json").write_text("{not json")
    assert model_few_shot(tmp_path, True) is True
    (tmp_path / "rstar_model.json").write_text(json.dumps({"few_shot": "no"}))
    assert model_few_shot(tmp_path, False) is False
