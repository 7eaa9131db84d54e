"""render_dropin quoting, mount ordering and install_unit's files."""

from __future__ import annotations

from pathlib import Path

import pytest

from phicapd.config import Settings, WatchRoot
from phicapd.errors import ConfigError
from phicapd.systemd import install_unit, packaged_unit_files, quote_path, render_dropin

REPO = Path(__file__).resolve().parents[2]


def _settings(*roots: str) -> Settings:
    return Settings(watch=[WatchRoot(path=Path(root)) for root in roots])


def _settings_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


@pytest.mark.parametrize(
    ("path", "word"),
    [
        ("/srv/photos", '"/srv/photos"'),
        ("/srv/my photos", '"/srv/my photos"'),
        ("/srv/100%", '"/srv/100%%"'),
        ('/srv/"best"', '"/srv/\\"best\\""'),
        ("/srv/a\\b", '"/srv/a\\\\b"'),
        ("/srv/it's", '"/srv/it\'s"'),
        ("/srv/Ünïcødé", '"/srv/Ünïcødé"'),
    ],
)
def test_quote_path(path: str, word: str) -> None:
    assert quote_path(path) == word


@pytest.mark.parametrize("bad", ["/srv/new\nline", "/srv/tab\there", "/srv/del\x7f"])
def test_control_characters_cannot_be_expressed(bad: str) -> None:
    with pytest.raises(ConfigError, match="control character"):
        quote_path(bad)


def test_dropin_lists_every_root_as_one_optional_word() -> None:
    text = render_dropin(_settings("/srv/photos", "/srv/my photos"))
    assert _settings_lines(text) == [
        "[Unit]",
        'RequiresMountsFor="/srv/photos"',
        'RequiresMountsFor="/srv/my photos"',
        "[Service]",
        'ReadWritePaths="-/srv/photos"',
        'ReadWritePaths="-/srv/my photos"',
    ]


@pytest.mark.parametrize(
    "path", ["/srv/photos", "/srv/my photos", "/srv/100%", '/srv/"best"', "/srv/a\\b", "/srv/Ünïcødé"]
)
def test_each_root_requires_its_mounts_quoted_like_read_write_paths(path: str) -> None:
    # RequiresMountsFor= has no "-" prefix (it would make the path relative and ignored), and
    # the same systemd.syntax(7) quoting: one word, %% for %, backslash escapes.
    lines = _settings_lines(render_dropin(_settings(path)))
    assert lines == [
        "[Unit]",
        f"RequiresMountsFor={quote_path(path)}",
        "[Service]",
        f"ReadWritePaths={quote_path('-' + path)}",
    ]


def test_a_symlinked_root_also_requires_the_mounts_of_its_target(tmp_path: Path) -> None:
    # systemd does not follow symlinks for RequiresMountsFor=: a root linked onto an NFS mount
    # must name the real path too. ReadWritePaths= follows links, so it keeps the root as given.
    target = tmp_path / "nas" / "photos"
    target.mkdir(parents=True)
    link = tmp_path / "photos"
    link.symlink_to(target)
    lines = _settings_lines(render_dropin(_settings(str(link), str(target))))
    assert [line for line in lines if line.startswith("RequiresMountsFor=")] == [
        f"RequiresMountsFor={quote_path(link)}",
        f"RequiresMountsFor={quote_path(target)}",  # once, though two roots lead there
    ]
    assert [line for line in lines if line.startswith("ReadWritePaths=")] == [
        f"ReadWritePaths={quote_path(f'-{link}')}",
        f"ReadWritePaths={quote_path(f'-{target}')}",
    ]


def test_a_missing_root_still_requires_its_mounts(tmp_path: Path) -> None:
    # Not mounted when install-unit runs: the path is written as configured.
    missing = tmp_path / "nas" / "not mounted yet"
    lines = _settings_lines(render_dropin(_settings(str(missing))))
    assert f"RequiresMountsFor={quote_path(missing)}" in lines


def test_roots_in_home_directories_relax_protect_home_to_read_only() -> None:
    lines = _settings_lines(render_dropin(_settings("/srv/photos", "/home/alice/Pictures")))
    assert "ProtectHome=read-only" in lines
    assert 'ReadWritePaths="-/home/alice/Pictures"' in lines
    for home in ("/root/photos", "/run/user/1000/photos", "/home"):
        assert "ProtectHome=read-only" in render_dropin(_settings(home))
    for other in ("/homes/photos", "/srv/home/photos", "/run/users"):
        assert "ProtectHome" not in render_dropin(_settings(other)), other


def test_no_roots_gives_an_empty_service_section_and_no_unit_section() -> None:
    assert _settings_lines(render_dropin(Settings())) == ["[Service]"]


def test_install_unit_writes_units_and_dropin(tmp_path: Path) -> None:
    unit_dir = tmp_path / "system"
    written = install_unit(_settings("/srv/photos"), unit_dir=unit_dir)
    dropin = unit_dir / "phicapd.service.d" / "50-watch-paths.conf"
    assert written == [unit_dir / "phicapd.service", unit_dir / "phicapd.socket", dropin]
    for name in ("phicapd.service", "phicapd.socket"):
        assert (unit_dir / name).read_text() == (REPO / "systemd" / name).read_text()
        assert (unit_dir / name).stat().st_mode & 0o777 == 0o644
    assert 'ReadWritePaths="-/srv/photos"' in dropin.read_text()
    assert 'RequiresMountsFor="/srv/photos"' in dropin.read_text()
    assert sorted(p.name for p in unit_dir.rglob("*")) == sorted(
        ["phicapd.service", "phicapd.socket", "phicapd.service.d", "50-watch-paths.conf"]
    ), "no temporary files are left behind"


@pytest.mark.parametrize("root", ["/tmp/inbox", "/var/tmp/photos", "/tmp"])
def test_install_unit_refuses_a_root_that_private_tmp_hides(tmp_path: Path, root: str) -> None:
    tmp = "/var/tmp" if root.startswith("/var/tmp") else "/tmp"
    with pytest.raises(ConfigError, match=f"watch root {root} is under {tmp}, which the unit's PrivateTmp=yes"):
        install_unit(_settings("/srv/photos", root), unit_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_phicapd_install_unit_exits_78_for_a_root_in_tmp(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from phicapd.cli.daemon import main

    config = tmp_path / "phicapd.toml"
    config.write_text('[[watch]]\npath = "/tmp/inbox"\n')
    assert main(["install-unit", "--config", str(config), "--unit-dir", str(tmp_path / "system")]) == 78
    assert "PrivateTmp=yes" in capsys.readouterr().err
    assert not (tmp_path / "system").exists()


def test_install_unit_dropin_only_rewrites_the_roots(tmp_path: Path) -> None:
    install_unit(_settings("/srv/old"), unit_dir=tmp_path)
    written = install_unit(_settings("/srv/new"), unit_dir=tmp_path, copy_units=False)
    assert written == [tmp_path / "phicapd.service.d" / "50-watch-paths.conf"]
    text = written[0].read_text()
    assert "/srv/new" in text and "/srv/old" not in text


def test_the_package_ships_the_canonical_units() -> None:
    files = packaged_unit_files()
    assert [f.name for f in files] == ["phicapd.service", "phicapd.socket"]
    for f in files:
        assert f.read_text() == (REPO / "systemd" / f.name).read_text()
