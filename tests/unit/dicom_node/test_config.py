"""Settings: defaults, overrides, and errors that name the file and the key."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.config import (
    ConfigError,
    Settings,
    StorageSettings,
    default_config_path,
    load_settings,
)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.yaml"
    p.write_text(text)
    return p


def test_shipped_default_file_equals_builtin_defaults() -> None:
    assert load_settings(default_config_path(), environ={}) == load_settings(environ={})


def test_defaults_match_the_product_card() -> None:
    s = load_settings(environ={})
    assert s.dimse.port == 11112 and s.dimse.ae_title == "DICOMNODE"
    assert s.rest.port == 5000
    assert s.database_url.startswith("sqlite:///") and s.database_url.endswith("data/node.db")
    assert s.path(s.watch[0].path) == Path("data/inbox")


def test_data_dir_moves_everything_together(tmp_path: Path) -> None:
    s = load_settings(overrides={"storage.data_dir": str(tmp_path)}, environ={})
    assert s.studies_dir == tmp_path / "studies"
    assert s.results_dir == tmp_path / "results"
    assert s.path(s.watch[0].path) == tmp_path / "inbox"
    assert s.jwt_secret_file == tmp_path / "jwt_secret"
    assert str(tmp_path.resolve() / "node.db") in s.database_url


def test_environment_and_cli_overrides(tmp_path: Path) -> None:
    cfg = write(tmp_path, "dimse:\n  port: 2000\n")
    s = load_settings(cfg, environ={"DICOM_NODE_DIMSE__PORT": "3000",
                                    "DICOM_NODE_REST__PORT": "6000"})
    assert s.dimse.port == 3000 and s.rest.port == 6000
    s = load_settings(cfg, environ={"DICOM_NODE_DIMSE__PORT": "3000"},
                      overrides={"dimse.port": 4000})
    assert s.dimse.port == 4000


@pytest.mark.parametrize("index", ["\u00b9", "\u0661", "9" * 5000])
def test_a_list_index_in_an_override_is_ascii_digits(tmp_path: Path, index: str) -> None:
    """"¹" (int() refuses it), an Arabic-Indic one (int() reads 1) and 5000 digits are no
    list index: the key is named, not a ValueError raised nor the second AE title changed."""
    cfg = write(tmp_path, "ae_titles:\n  - ae_title: A\n  - ae_title: B\n")
    with pytest.raises(ConfigError, match="list index out of range"):
        load_settings(cfg, environ={f"DICOM_NODE_AE_TITLES__{index}__TIMEOUT_S": "3"})
    with pytest.raises(ConfigError, match="list index out of range"):
        load_settings(cfg, environ={}, overrides={f"ae_titles.{index}.timeout_s": 3})
    with pytest.raises(ConfigError, match="list index out of range"):
        load_settings(cfg, environ={}, overrides={f"ae_titles.{index}": {"ae_title": "C"}})


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(Exception):
        s.dimse = s.dimse  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("dimse:\n  prot: 104\n", "dimse.prot", "unknown key"),
        ("dimse:\n  port: many\n", "dimse.port", "integer"),
        ("dimse:\n  port: 70000\n", "dimse.port", "65535"),
        ("dimse:\n  ae_title: THIS_TITLE_IS_TOO_LONG\n", "dimse.ae_title", "16"),
        ("ae_titles:\n  - ae_title: 'BAD\\\\AE'\n", "ae_titles.0.ae_title", "backslash"),
        ("ae_titles:\n  - ae_title: X\n    grouping: patient\n", "ae_titles.0.grouping", "study"),
        ("ae_titles:\n  - ae_title: X\n    timeout_s: -1\n", "ae_titles.0.timeout_s", "greater"),
        ("ae_titles:\n  - ae_title: X\n    pipelines: [nope]\n", "ae_titles.0.pipelines",
         "'nope' is not defined in pipelines"),
        ("executor:\n  workers: 0\n", "executor.workers", "greater"),
        ("executor:\n  kind: celery\n", "executor.kind", "'thread'"),  # not built: refused
        ("destinations:\n  - name: pacs\n    type: dimse\n    host: h\n", "destinations.0",
         "needs ae_title, port"),
        ("destinations:\n  - {name: a, type: folder, path: x}\n  - {name: a, type: folder, "
         "path: y}\n", "destinations.1", "duplicate name 'a'"),
        ("dimse:\n  tls:\n    certificate: nope.pem\n    private_key: nope.key\n",
         "dimse.tls.certificate", "file not found"),
        ("models:\n  - name: m\n    path: /does/not/exist\n", "models.0.path", "not found"),
        ("destinations:\n  - {name: w, type: dicomweb, url: 'http://al:pw@h/dicom-web'}\n",
         "destinations.0.url", "DICOMweb URL must not carry credentials"),
        ("sources:\n  - {name: s, ae_title: S, host: h, dicomweb_url: 'ftp://h/dw'}\n",
         "sources.0.dicomweb_url", "must use http or https"),
        ("logging: 3\n", "logging", "valid dictionary"),
        ("dimse: [\n", "line", "not valid YAML"),
        ("storage:\n  retention_days: 30\nstorage:\n  min_free_mb: 100\n", "line 3",
         "'storage' is given twice (first on line 1)"),
        ("- a\n- b\n", "", "mapping of sections"),
        ("auth:\n  algorithms: [none]\n", "auth.algorithms.0", "HS256"),
        ("rest:\n  single_inference_pipeline: nope\n", "rest.single_inference_pipeline",
         "'nope' is not defined in pipelines"),
        ("models:\n  - {name: m, path: /}\npipelines:\n  - {name: seg, model: m, task: segment}\n"
         "rest:\n  single_inference_pipeline: seg\n", "rest.single_inference_pipeline",
         "does not classify"),
        ("models:\n  - {name: m, path: /}\npipelines:\n  - {name: c, model: m, task: classify,"
         " secondary_capture: {compression: png}}\n",
         "pipelines.0.secondary_capture.compression", "'none' or 'jpeg'"),
        # the node's own folders apart, and nothing else writing into them
        ("watch:\n  - {name: in, path: studies}\n", "watch.0.path",
         "overlaps storage.studies_dir"),
        ("watch:\n  - {name: in, path: .}\n", "watch.0.path", "overlaps storage.studies_dir"),
        ("storage:\n  results_dir: studies/r\n", "storage.results_dir",
         "overlaps storage.studies_dir"),
        ("watch:\n  - {name: a, path: in}\n  - {name: b, path: in/sub}\n", "watch.1.path",
         "overlaps watch.0.path"),
        ("watch:\n  - {name: a, path: in, output: in/results}\n", "watch.0.output",
         "inside watch.0.path"),
        ("destinations:\n  - {name: d, type: folder, path: inbox/out}\n",
         "destinations.0.path", "inside watch.0.path"),
        ("destinations:\n  - {name: d, type: folder, path: studies}\n",
         "destinations.0.path", "inside storage.studies_dir"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, key: str, problem: str) -> None:
    cfg = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    message = str(info.value)
    assert message.startswith(str(cfg)), message
    assert key in message and problem in message, message


def test_every_problem_is_named_at_once_with_the_key_meant(tmp_path: Path) -> None:
    """A first configuration with several slips: each is a line, an unknown key comes
    with the close one it may mean, and a top-level section put inside another says so
    (it was one problem at a time, 'unknown key' alone)."""
    cfg = write(tmp_path, "dimse:\n  ae_titles: []\nae_titles:\n  - title: CT_AI\n"
                          "    timeout: 10\ndestinations:\n  - {name: pacs, type: dimse, "
                          "ae_title: PACS, host: h, port: 4242x}\nstorage:\n  colour: red\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    lines = str(info.value).splitlines()
    assert all(line.startswith(f"{cfg}: ") for line in lines)
    problems = {line[len(f"{cfg}: "):] for line in lines}
    assert problems == {
        "dimse.ae_titles: unknown key ('ae_titles' is a top-level section)",
        "ae_titles.0.ae_title: required key is missing",
        "ae_titles.0.title: unknown key (did you mean 'ae_title'?)",
        "ae_titles.0.timeout: unknown key (did you mean 'timeout_s'?)",
        "destinations.0.port: Input should be a valid integer, unable to parse string as "
        "an integer",
        "storage.colour: unknown key (known here: " + ", ".join(StorageSettings.model_fields)
        + ")",
    }
    assert len(info.value.more) == 5  # the first is info.value.key and .problem


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nothere.yaml: file not found"):
        load_settings(tmp_path / "nothere.yaml", environ={})


def test_bad_environment_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match="dimse.port"):
        load_settings(environ={"DICOM_NODE_DIMSE__PORT": "abc"})
    # a slip in a variable's name is not in the file: the message says where it is
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"DICOM_NODE_DIMSE__PROT": "1"})
    assert str(info.value) == ("<defaults>: dimse.prot: unknown key (did you mean 'port'?) "
                               "(set by environment variable DICOM_NODE_DIMSE__PROT)")


def test_every_broken_reference_is_named_in_one_run(tmp_path: Path) -> None:
    """Three slipped names, a port shared by both listeners and a drop folder over the
    studies: five lines, not five runs."""
    cfg = write(tmp_path, (
        "models:\n  - {name: m, path: /}\n"
        "pipelines:\n  - {name: p, model: mm, task: classify, destinations: [pacz]}\n"
        "ae_titles:\n  - {ae_title: AI, pipelines: [q]}\n"
        "watch:\n  - {name: in, path: studies}\n"
        "dimse:\n  port: 5000\nrest:\n  port: 5000\n"))
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    studies = (Path("data") / "studies").resolve()  # relative to the data directory
    assert str(info.value).splitlines() == [
        f"{cfg}: ae_titles.0.pipelines: 'q' is not defined in pipelines",
        f"{cfg}: pipelines.0.model: 'mm' is not defined in models",
        f"{cfg}: pipelines.0.destinations: 'pacz' is not defined in destinations",
        f"{cfg}: rest.port: 5000 is dimse.port too; the HTTP and DICOM listeners need a "
        "port each",
        f"{cfg}: watch.0.path: {studies} overlaps storage.studies_dir ({studies}); the "
        "node's folders must be apart",
    ]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", *args],
                          capture_output=True, text=True)


def test_check_config_exit_codes(tmp_path: Path) -> None:
    ok = _cli("check-config", str(default_config_path()))
    assert ok.returncode == 0 and "OK" in ok.stdout
    bad = _cli("check-config", str(write(tmp_path, "rest:\n  port: -1\n")))
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "rest.port" in lines[0] and str(tmp_path) in lines[0]


def test_serve_with_bad_config_exits_2(tmp_path: Path) -> None:
    r = _cli("serve", "--config", str(write(tmp_path, "colour: blue\n")))
    assert r.returncode == 2 and "colour: unknown key" in r.stderr


def test_demo_models_feed_the_default_ae_title_and_drop_folder() -> None:
    s = load_settings(environ={})
    assert [m.name for m in s.models] == ["cxr-findings", "ct-organs"]
    assert all(s.model_path(m).is_dir() for m in s.models)
    assert s.ae_titles[0].pipelines == ["cxr-findings", "ct-organs"]
    assert s.watch[0].pipelines == ["cxr-findings", "ct-organs"]
    assert [p.series.modalities for p in s.pipelines] == [["CR", "DX"], ["CT"]]


def test_a_file_with_its_own_models_gets_no_demo_pipelines(tmp_path: Path) -> None:
    model = tmp_path / "m.ts"
    model.write_bytes(b"")
    s = load_settings(write(tmp_path, f"models:\n  - name: mine\n    path: {model}\n"),
                      environ={})
    assert [m.name for m in s.models] == ["mine"]
    assert s.pipelines == [] and s.ae_titles[0].pipelines == [] and s.watch[0].pipelines == []


def test_a_pipeline_names_how_its_secondary_capture_is_encoded(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, (
        "models:\n  - {name: m, path: /}\n"
        "pipelines:\n  - name: c\n    model: m\n    task: classify\n"
        "    secondary_capture: {compression: jpeg, quality: 85, max_size: 1024}\n"
        "  - {name: d, model: m, task: classify}\n")), environ={})
    jpeg, default = (p.secondary_capture for p in s.pipelines)
    assert (jpeg.compression, jpeg.quality, jpeg.max_size) == ("jpeg", 85, 1024)
    assert (default.compression, default.max_size) == ("none", None)  # lossless, full size


EXAMPLES = Path(__file__).resolve().parents[3] / "configs" / "examples"


@pytest.mark.parametrize("where", ["embedded", "node.yaml", "pacs.yaml"])
def test_the_shipped_chest_rules_take_only_a_chest_frontal_radiograph(where: str) -> None:
    """A knee or hand CR (PA) got chest findings, an SR and a PDF: the shipped chest
    pipeline now takes Body Part Examined CHEST (or none: it is optional), a PA or AP
    view; its CT pipeline names no body part."""
    path = {"embedded": None, "node.yaml": default_config_path(),
            "pacs.yaml": EXAMPLES / "pacs.yaml"}[where]
    pipelines = {p.name: p for p in load_settings(path, environ={}).pipelines}
    chest = pipelines["cxr-findings"].series
    assert chest.modalities == ["CR", "DX"]
    assert chest.body_parts == ["CHEST"] and chest.view_positions == ["PA", "AP"]
    assert pipelines["ct-organs"].series.body_parts == []


def test_the_embedded_default_pipelines_are_node_yaml_s() -> None:
    shipped = load_settings(default_config_path(), environ={})
    embedded = load_settings(environ={})
    for name in ("cxr-findings", "ct-organs"):
        a = next(p for p in shipped.pipelines if p.name == name)
        b = next(p for p in embedded.pipelines if p.name == name)
        assert a.series == b.series, name


@pytest.mark.parametrize("name", ["pacs.yaml", "scale-out.yaml"])
def test_example_configs_are_valid(name: str) -> None:
    load_settings(EXAMPLES / name)


def test_tls_example_fails_only_for_its_certificate_files() -> None:
    with pytest.raises(ConfigError, match=r"tls\.certificate: file not found"):
        load_settings(EXAMPLES / "tls.yaml")


def test_systemd_unit_runs_commands_the_cli_accepts(tmp_path: Path) -> None:
    import configparser
    import shlex
    import shutil

    from dicom_node.cli import build_parser

    text = (EXAMPLES / "dicom-node.service").read_text()
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(text)
    service = unit["Service"]
    data_dirs = set()
    for key in ("ExecStartPre", "ExecStart"):
        argv = shlex.split(service[key])
        assert argv[0].endswith("/.venv/bin/dicom-node")
        args = build_parser().parse_args(argv[1:])  # SystemExit(2) on an option it lacks
        data_dirs.add(args.data_dir)
    assert len(data_dirs) == 1 and None not in data_dirs  # the check sees what serve uses
    # systemd waits longer than the node's default grace for running jobs
    assert float(service["TimeoutStopSec"]) > Settings().executor.grace_period_s
    if shutil.which("systemd-analyze"):
        here = Path(sys.executable).parent / "dicom-node"
        local = tmp_path / "dicom-node.service"
        local.write_text(text.replace("/opt/dicom-node/.venv/bin/dicom-node", str(here)))
        out = subprocess.run(["systemd-analyze", "verify", str(local)],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr


def test_check_config_models_loads_each_model_and_names_the_broken_one(tmp_path: Path) -> None:
    """--models loads every model as serve would: the demo models OK, a bundle with
    unreadable weights FAILED with the reason, exit 1."""
    broken = tmp_path / "broken"
    shutil.copytree(default_config_path().parents[1] / "pipeline" / "models" / "cxr-findings",
                    broken)
    (broken / "models" / "model.pt").write_bytes(b"garbage")
    config = write(tmp_path, "models:\n"
                   "  - {name: cxr-findings, path: pipeline/models/cxr-findings}\n"
                   f"  - {{name: broken, path: {broken}}}\n"
                   "ae_titles: []\nwatch: []\npipelines:\n"
                   "  - {name: chest, model: cxr-findings, task: classify}\n"
                   "  - {name: oops, model: cxr-findings, task: segment}\n")
    r = _cli("check-config", str(config), "--models", "--data-dir", str(tmp_path / "data"))
    assert r.returncode == 1, r.stderr
    lines = r.stdout.splitlines()
    ok = next(ln for ln in lines if ln.strip().startswith("cxr-findings"))
    assert ok.split()[2:7] == ["OK", "classify,", "11", "labels,", "input"]
    bad = next(ln for ln in lines if ln.strip().startswith("broken"))
    assert "FAILED  BundleError: corrupt weights file" in bad and str(broken) in bad
    # a pipeline whose task is not its model's: every job of it would fail
    oops = next(ln for ln in lines if ln.strip().startswith("pipeline oops"))
    assert "FAILED  task segment, but model 'cxr-findings' classifies" in oops
    assert not any(ln.strip().startswith("pipeline chest") for ln in lines)


def test_sop_classes_by_uid_or_keyword(tmp_path: Path) -> None:
    """An AE title's SOP class lists take UIDs (a vendor's private ones too) or pydicom's
    keywords; a keyword with a slip is refused with the one meant."""
    cfg = write(tmp_path, "ae_titles:\n  - ae_title: CT\n    allowed_sop_classes: "
                          "[CTImageStorage, ' 1.3.12.2.1107.5.9.1 ', CTImageStorage]\n"
                          "    ignored_sop_classes: [GrayscaleSoftcopyPresentationStateStorage]\n")
    ae = load_settings(cfg, environ={}).ae_titles[0]
    assert ae.allowed_sop_classes == ["1.2.840.10008.5.1.4.1.1.2", "1.3.12.2.1107.5.9.1"]
    assert ae.ignored_sop_classes == ["1.2.840.10008.5.1.4.1.1.11.1"]
    bad = write(tmp_path, "ae_titles:\n  - ae_title: CT\n    ignored_sop_classes: "
                          "[CTImagStorage]\n")
    with pytest.raises(ConfigError) as info:
        load_settings(bad, environ={})
    assert "ae_titles.0.ignored_sop_classes" in str(info.value)
    assert "did you mean 'CTImageStorage'?" in str(info.value)


def test_a_drop_folder_without_pipelines_is_warned_about(tmp_path: Path) -> None:
    """Such a folder takes files and moves them to done/ and makes no job: check-config
    says so (still exit 0: it is valid) and so does the node's start-up log. An AE
    title without pipelines (an archive) is shown as storing only, not warned about."""
    import structlog

    from dicom_node.config import load_settings
    from tests.support.inproc import node_settings, running_node

    config = write(tmp_path, f"""
ae_titles:
  - {{ae_title: ARCHIVE}}
watch:
  - {{name: scans, path: {tmp_path / 'scans'}}}
  - {{name: cxr, path: {tmp_path / 'cxr'}, pipelines: [cxr-findings]}}
""")
    r = _cli("check-config", str(config))
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"dicom-node: warning: {config}: watch.0.pipelines: drop folder scans has no "
        "pipelines: files are stored, no job is made"]
    assert "called AE titles: ARCHIVE (stores only)" in r.stdout
    assert f"{tmp_path / 'scans'} (no pipelines), {tmp_path / 'cxr'}" in r.stdout
    assert load_settings(default_config_path()).warnings() == []

    (tmp_path / "scans").mkdir()
    settings = node_settings(tmp_path / "data", ae_titles=[{"ae_title": "ARCHIVE"}],
                             watch=[{"name": "scans", "path": str(tmp_path / "scans")}])
    with structlog.testing.capture_logs() as logs:
        async def start_and_stop() -> None:
            async with running_node(settings):
                pass
        asyncio.run(start_and_stop())
    warned = [e["event"] for e in logs if e["log_level"] == "warning"]
    assert warned == ["configuration: watch.0.pipelines: drop folder scans has no "
                      "pipelines: files are stored, no job is made"]


@pytest.mark.parametrize("url, message", [
    ("mysql://node:pw@db/node", "unsupported database 'mysql'"),
    ("postgresql://node:pw@db:notaport/node", "not a database URL"),
])
def test_a_database_the_store_cannot_use_is_named_at_load(tmp_path: Path, url: str,
                                                          message: str) -> None:
    """`mysql://` passed check-config and then crashed serve with a traceback; a
    malformed URL did too. Neither message repeats the URL (it holds a password)."""
    config = write(tmp_path, f"storage:\n  database_url: {url}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config, environ={})
    assert "storage.database_url" in str(info.value) and message in str(info.value)
    assert "pw" not in str(info.value)


def test_check_config_masks_the_database_password(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The systemd unit runs check-config before each start: the password went to the
    journal at every start (serve masked it)."""
    from dicom_node.cli import main

    config = write(tmp_path, "storage:\n  database_url: "
                             "postgresql://node:s3cretpw@127.0.0.1:5432/dn\n")
    assert main(["check-config", str(config), "--data-dir", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "s3cretpw" not in out and "postgresql://node:***@127.0.0.1:5432/dn" in out


def test_serve_makes_files_its_group_may_read_and_others_not(tmp_path: Path) -> None:
    """Results and reports followed the usual umask 022: readable by every user."""
    assert StorageSettings().umask == "027"
    probe = (
        "import os, sys\n"
        "from dicom_node import cli\n"
        "def fake_run(self):\n"
        "    async def run(): open(sys.argv[1], 'w').close()\n"  # a file serve makes
        "    return run()\n"
        "import dicom_node.node as n\n"
        "n.Node.run = fake_run\n"
        "sys.exit(cli.main(['serve', '--data-dir', sys.argv[2]]))\n")
    made = tmp_path / "made.txt"
    subprocess.run([sys.executable, "-c", probe, str(made), str(tmp_path / "d")],
                   check=True, timeout=120)
    assert made.stat().st_mode & 0o777 == 0o640


def test_shared_storage_needs_absolute_folders_and_postgresql(tmp_path: Path) -> None:
    cfg = write(tmp_path, "storage:\n  shared: true\n  studies_dir: /mnt/shared/studies\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    assert "storage.results_dir: with storage.shared, give the absolute path" in str(info.value)
    cfg = write(tmp_path, "storage:\n  shared: true\n  studies_dir: /mnt/shared/studies\n"
                          "  results_dir: /mnt/shared/results\n")
    settings = load_settings(cfg, environ={})
    assert settings.storage.shared
    assert any(w.startswith("storage.shared: the store is SQLite") for w in settings.warnings())


def test_scale_out_example_gives_each_machine_its_own_data_dir() -> None:
    s = load_settings(EXAMPLES / "scale-out.yaml", environ={})
    assert s.storage.shared and s.database_url.startswith("postgresql://")
    for folder in (s.studies_dir, s.results_dir):  # shared, outside the local data_dir
        assert folder.is_absolute() and not folder.is_relative_to(s.data_dir)


def test_anonymous_scopes_are_known_scopes_and_never_admin(tmp_path: Path) -> None:
    assert load_settings(environ={}).auth.anonymous_scopes == []
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, "auth:\n  anonymous_scopes: [read, admin]\n"), environ={})
    assert "auth.anonymous_scopes: Value error, admin is never given to requests without " \
        "credentials" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, "auth:\n  anonymous_scopes: [metrics]\n"), environ={})
    assert "auth.anonymous_scopes.0: Input should be 'infer', 'read' or 'admin'" \
        in str(info.value)
    read = load_settings(write(tmp_path, "auth:\n  anonymous_scopes: [read, read]\n"),
                         environ={})
    assert read.auth.anonymous_scopes == ["read"] and read.warnings() == []
    infer = load_settings(write(tmp_path, "auth:\n  anonymous_scopes: [infer]\n"), environ={})
    assert [w for w in infer.warnings() if w.startswith("auth.anonymous_scopes: anyone who "
                                                        "reaches the HTTP port runs the models")]
    with pytest.raises(ConfigError, match="admin is never given"):
        load_settings(environ={"DICOM_NODE_AUTH__ANONYMOUS_SCOPES": "[admin]"})
    assert load_settings(environ={"DICOM_NODE_AUTH__ANONYMOUS_SCOPES": "[read]"}
                         ).auth.anonymous_scopes == ["read"]


def test_api_key_projects_are_names_or_ids(tmp_path: Path) -> None:
    key = "0" * 64
    s = load_settings(write(tmp_path, "auth:\n  api_keys:\n"
                            f"    - {{name: lab, key_sha256: '{key}', projects: [AI_CXR, 3]}}\n"
                            f"    - {{name: all, key_sha256: '{key}'}}\n"), environ={})
    assert s.auth.api_keys[0].projects == ["AI_CXR", 3]
    assert s.auth.api_keys[1].projects is None
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, "auth:\n  api_keys:\n"
                            f"    - {{name: lab, key_sha256: '{key}', projects: [1.5]}}\n"),
                      environ={})
    assert "auth.api_keys.0.projects.0" in str(info.value)
