"""Options from the command line and the TOML file, and their errors."""

import subprocess

import pytest

from gateway.config import ConfigError, Options, build_config
from gateway.net.endpoints import parse_endpoint
from tests.conftest import script


def test_defaults():
    config = build_config({})
    assert str(config.data_dir) == "gateway-data"
    assert config.db is None
    assert config.https.kind == "ssl" and config.https.port == 8443
    assert config.max_body == 1024 * 1024
    assert [(e.kind, e.port) for e in config.mqtt] == [("ssl", 8883)]


def test_mqtt_endpoints_or_off():
    assert build_config({"mqtt": "off"}).mqtt == ()
    assert build_config({}, {"mqtt": []}).mqtt == ()
    both = build_config({"mqtt": ["tcp:1883", "ssl:8883"]}).mqtt
    assert [(e.kind, e.port, e.tls) for e in both] == [("tcp", 1883, False), ("ssl", 8883, True)]
    with pytest.raises(ConfigError, match="mqtt"):
        build_config({"mqtt": "udp:1883"})


def test_file_values_and_command_line_wins(tmp_path):
    config = build_config({"max-body": "2048"}, {"max-body": 4096, "pool-size": 2, "db": "dbname=x"})
    assert config.max_body == 2048
    assert config.pool_size == 2
    assert config.db == "dbname=x"


def test_options_read_the_config_file(tmp_path):
    f = tmp_path / "gw.toml"
    f.write_text('data_dir = "/srv/gw"\nhttps = "ssl:9443"\ncommit-delay = 0.01\n')
    options = Options()
    options.parseOptions(["--config", str(f), "--https", "tcp:8080"])
    config = options.gateway_config
    assert str(config.data_dir) == "/srv/gw"
    assert config.https.kind == "tcp" and config.https.port == 8080
    assert config.commit_delay == 0.01


@pytest.mark.parametrize(
    "values,option,words",
    [
        ({"max-body": "lots"}, "max-body", "not a whole number"),
        ({"max-body": "1"}, "max-body", "outside"),
        ({"pool-size": "0"}, "pool-size", "outside"),
        ({"https": "ssl:99999"}, "https", "port"),
        ({"https": "unix:/tmp/s"}, "https", "endpoint type"),
        ({"https": "ssl:8443:privateKey=/nonexistent.pem"}, "https", "not a readable file"),
        ({"https": "tcp:80:colour=blue"}, "https", "unknown parameter"),
        ({"tls-cert": "/nonexistent.crt"}, "tls-cert", "not a readable file"),
        ({"db": "host=x port"}, "db", "not a valid PostgreSQL connection string"),
        ({"commit-delay": "-1"}, "commit-delay", "outside"),
        ({"pack-after": "soon"}, "pack-after", "not a duration"),
        ({"manhole": "ssl:2222"}, "manhole", "endpoint type must be one of tcp:"),
        ({"metrics": "tcp:9100:colour=blue"}, "metrics", "unknown parameter"),
        ({"manhole-keys": "/nonexistent/authorized_keys"}, "manhole-keys", "not a readable file"),
        ({"log-format": "xml"}, "log-format", "'xml' is not one of text, json"),
        ({"log-level": "chatty"}, "log-level", "is not one of debug"),
        ({"sink-stall": "1"}, "sink-stall", "outside"),
        ({"ui-tiles": "http://tiles.example/{z}/{x}/{y}.png"}, "ui-tiles", "give an https:// tile URL"),
        ({"ui-tiles": "https://tiles.example/{z}/{x}.png"}, "ui-tiles", "lacks {y}"),
        ({"ui-tiles": "https://tiles.example/{z}/{x}/{y}.png; script-src *"}, "ui-tiles", "cannot be in a tile URL"),
        ({"ui-tiles": "https://me:pw@tiles.example/{z}/{x}/{y}.png"}, "ui-tiles", "credentials"),
    ],
)
def test_bad_values_name_the_option(values, option, words):
    with pytest.raises(ConfigError) as e:
        build_config(values)
    assert e.value.option == option
    assert str(e.value).startswith(f"--{option}: ")
    assert words in str(e.value)


def test_cert_without_key_is_refused(tmp_path):
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError, match="--tls-key: .*give both"):
        build_config({"tls-cert": str(cert)})


def test_unknown_key_in_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        build_config({}, {"colour": "blue"})


def test_a_bare_port_for_the_console_or_metrics_means_loopback_only():
    config = build_config({"manhole": "2222", "metrics": 9100})
    assert config.manhole.tcp_description() == "tcp:2222:interface=127.0.0.1:backlog=1024"
    assert config.metrics.tcp_description() == "tcp:9100:interface=127.0.0.1:backlog=1024"
    assert build_config({"manhole": "tcp:2222:interface=10.0.0.1"}).manhole.interface == "10.0.0.1"
    assert build_config({}).manhole is None  # off unless asked for


def test_endpoint_strings():
    spec = parse_endpoint(r"ssl:8443:interface=127.0.0.1:backlog=100")
    assert (spec.port, spec.interface, spec.backlog) == (8443, "127.0.0.1", 100)
    assert spec.tcp_description() == "tcp:8443:interface=127.0.0.1:backlog=100"
    spec = parse_endpoint(r"tcp:port=0:interface=\:\:1")
    assert spec.interface == "::1" and spec.port == 0
    assert parse_endpoint(spec.tcp_description()).interface == "::1"


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--max-body", "huge"], "--max-body: 'huge' is not a whole number"),
        (["--https", "ssl:notaport"], "--https: 'ssl:notaport': port 'notaport'"),
        (["--frobnicate"], "option --frobnicate not recognized"),
        (["--log-format", "xml"], "--log-format: 'xml' is not one of text, json"),
    ],
)
def test_twistd_stops_with_one_line(tmp_path, argv, words):
    proc = subprocess.run(
        [
            script("twistd"),
            "-n",
            "--pidfile=",
            "gateway",
            "--data-dir",
            str(tmp_path / "d"),
            "--device",
            "tcp:0:interface=127.0.0.1",
            "--mqtt",
            "off",
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert words in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_twistd_port_in_use_stops_with_one_line(tmp_path):
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        proc = subprocess.run(
            [
                script("twistd"),
                "-n",
                "--pidfile=",
                "gateway",
                "--data-dir",
                str(tmp_path / "d"),
                "--https",
                f"ssl:{port}:interface=127.0.0.1",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        busy.close()
    assert proc.returncode != 0
    # twistd has taken over stderr by now: the line arrives through its log
    output = proc.stdout + proc.stderr
    assert "twistd gateway: --https: cannot listen on" in output
    assert "Address already in use" in output
    assert "Traceback" not in output


def test_a_tile_server_widens_the_dashboards_policy_by_its_origin_alone():
    from gateway.ui.resource import CSP
    from gateway.ui.tiles import page_meta, page_policy

    assert page_policy(CSP, None) == CSP and page_meta(None, None) == b""
    config = build_config(
        {"ui-tiles": "https://tiles.example:8443/osm/{z}/{x}/{y}.png", "ui-tiles-attribution": "© <b>"}
    )
    policy = page_policy(CSP, config.ui_tiles).decode()
    assert "img-src 'self' data: blob: https://tiles.example:8443;" in policy
    assert "connect-src 'self' https://tiles.example:8443;" in policy
    assert policy.endswith("; worker-src blob:") and "script-src 'self';" in policy
    assert policy.replace(" https://tiles.example:8443", "").replace("; worker-src blob:", "") == CSP.decode()
    meta = page_meta(config.ui_tiles, config.ui_tiles_attribution).decode()
    assert 'content="https://tiles.example:8443/osm/{z}/{x}/{y}.png"' in meta and "&lt;b&gt;" in meta
