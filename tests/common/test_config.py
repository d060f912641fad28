"""Config: defaults, drop-ins merged in directory then name order, --show-config, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from oma_common import config
from oma_common.errors import Invalid
from omad.config import Config


def test_defaults_without_files(tmp_path: Path) -> None:
    cfg = config.load(Config, [tmp_path / "none"])
    assert (cfg.api.listen_address, cfg.api.port) == ("127.0.0.1", 8082)
    assert cfg.database_path == Path("/var/lib/oma/oma.db")
    assert cfg.agent_socket("nbd-pool") == Path("/run/oma/nbd-pool.sock")


def test_dropins_override_in_order(tmp_path: Path) -> None:
    vendor, admin = tmp_path / "usr", tmp_path / "etc"
    vendor.mkdir()
    admin.mkdir()
    (vendor / "10-a.toml").write_text('state_dir = "/a"\n[api]\nport = 1\n')
    (vendor / "20-b.toml").write_text('[api]\nport = 2\nmax_body_bytes = 4096\n')
    (admin / "05-z.toml").write_text('[api]\nport = 3\n')
    cfg = config.load(Config, [vendor, admin])
    assert (cfg.state_dir, cfg.api.port, cfg.api.max_body_bytes) == ("/a", 3, 4096)


def test_bad_values_name_the_option_and_the_file(tmp_path: Path) -> None:
    (tmp_path / "x.toml").write_text('[api]\nport = "eighty"\n')
    with pytest.raises(Invalid) as e:
        config.load(Config, [tmp_path])
    assert "api.port: must be an integer" in e.value.details and "x.toml" in e.value.details
    (tmp_path / "x.toml").write_text("[api\n")
    with pytest.raises(Invalid, match="cannot read config file"):
        config.load(Config, [tmp_path])


@pytest.mark.parametrize("module", ["omad", "nbd_pool", "restore_mounter", "volume_agent"])
def test_show_config_prints_effective_json(tmp_path: Path, module: str) -> None:
    (tmp_path / "a.toml").write_text('log_level = "DEBUG"\n')
    out = subprocess.run([sys.executable, "-m", module, "--config", str(tmp_path), "--show-config"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["log_level"] == "DEBUG"


def test_invalid_config_exits_1_with_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("[socket]\nmode = \"rw\"\n")
    out = subprocess.run([sys.executable, "-m", "nbd_pool", "--config", str(tmp_path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "socket.mode: must be an integer" in out.stderr and "Traceback" not in out.stderr
