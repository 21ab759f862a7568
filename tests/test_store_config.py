"""soci-store's TOML configuration: upstream's keys, defaults, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from soci.errors import SociError
from soci.store.config import load_store_config


def test_defaults_and_upstream_keys(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("")
    cfg = load_store_config(str(path))
    assert (cfg.max_retries, cfg.min_wait_msec, cfg.max_wait_msec) == (5, 30, 300)
    assert not cfg.background_fetch.disable
    path.write_text("""
root = "/srv/soci"
[http]
MaxRetries = 8
MinWaitMsec = 50
RequestTimeoutMsec = 20000
[blob]
max_wait_msec = 1000
[background_fetch]
disable = true
silence_period_msec = 10
fetch_period_msec = 5
[fuse]
attr_timeout = 60
entry_timeout = 30
[cache]
memory_mb = 64
disk_mb = 128
release_grace_sec = 5
[directory_cache]  # upstream's, accepted and ignored
x = 1
""")
    cfg = load_store_config(str(path))
    assert cfg.root == "/srv/soci"
    assert (cfg.max_retries, cfg.min_wait_msec, cfg.max_wait_msec) == (8, 50, 1000)
    assert cfg.fetching_timeout_sec == 20.0
    assert cfg.background_fetch.disable and cfg.background_fetch.fetch_period_msec == 5
    assert (cfg.attr_timeout, cfg.entry_timeout) == (60.0, 30.0)
    assert (cfg.memory_bytes, cfg.disk_bytes, cfg.release_grace_sec) == (64 << 20, 128 << 20, 5)


@pytest.mark.parametrize(("text", "message"), [
    ("[blob]\nmax_retries = 'lots'\n", "max_retries must be an integer"),
    ("[cache\n", "not valid TOML"),
    ("background_fetch = 3\n", "must be a table"),
])
def test_bad_config_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(SociError, match=message):
        load_store_config(str(path))
    with pytest.raises(SociError, match="does not exist"):
        load_store_config(str(tmp_path / "missing.toml"))
