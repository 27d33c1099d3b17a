"""Two processes of one sharded or distributed run start on an empty folder side by side: while
one binds its config, the other's folder check (taken without the config lock) must never find a
config.json without the run's kind record beside it. Before the record was written first, the
two-rank gloo test failed now and then with "is not empty and holds no diffcore run"."""

import json

from diffcore import _folder
from diffcore.experiments import base


def test_a_shard_checking_the_folder_during_another_shards_bind_accepts_it(tmp_path, monkeypatch):
    out = tmp_path / "out"
    record_kind = _folder.record_kind
    checks = []

    def record_while_another_shard_checks(root, kind):
        _folder.check_kind(root, kind, adopt=base._earlier_study_run)  # raises if config.json came first
        checks.append(kind)
        record_kind(root, kind)

    monkeypatch.setattr(_folder, "record_kind", record_while_another_shard_checks)
    first = base.Workspace(out)
    with first.claim("mystudy", shared=True):
        first.bind_config({"a": 1})
    assert checks == ["mystudy"]
    assert json.loads((out / "config.json").read_text()) == {"a": 1}
    second = base.Workspace(out)  # the other shard, after the first bound: same config, accepted
    with second.claim("mystudy", shared=True):
        second.bind_config({"a": 1})
    assert checks == ["mystudy", "mystudy"]
