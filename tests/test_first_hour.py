"""A new user's first hour (issue 17): typos name the closest spelling, CLI errors are one line,
gateways of different profiles keep their own data, export-dpo says why it wrote nothing, and the
no-API-key path (replay mode, `llm-router demo`) works as the README says."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from gateway.cli import build_parser, main, serve_settings
from gateway.config import Settings, load_settings
from gateway.config_errors import env_near_misses
from gateway.providers.replay import load
from tests.conftest import make_settings, model
from tests.test_lab import outcome, write_replay

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "replay"


@pytest.fixture
def duo(tmp_path) -> Path:
    """Two models, the dearer one better; no prompt twice."""
    records = [
        {
            "id": f"r{i}",
            "task": "t",
            "messages": [{"role": "user", "content": f"Question number {i}: what is {i} + {i}?"}],
            "outcomes": {
                "cheap": outcome(float(i % 2), None, f"cheap {i}", 12, 4),
                "dear": outcome(1.0, None, f"dear {i}", 12, 4),
            },
        }
        for i in range(40)
    ]
    return write_replay(tmp_path / "duo.jsonl", records, {"cheap": (0.1, 0.2), "dear": (10.0, 30.0)})


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


# --- finding 8: CLI errors are one clear line and exit status 2


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["export-dpo", "--out", "x.jsonl", "--since", "yesterday"], "'yesterday' is not an ISO 8601 time"),
        (["replay", "nope.jsonl"], "replay file 'nope.jsonl' does not exist"),
        (["serve", "--config", str(ROOT / "config.prod.yaml")], "GATEWAY_API_KEYS is empty"),
        (["replay", "x.jsonl", "--set", "COST_WEIGHTT=0"], "did you mean 'COST_WEIGHT'?"),
        (["sweep", "x.jsonl", "--grid", "COST_WEIGHTT=0,1"], "did you mean 'COST_WEIGHT'?"),
        (
            ["sweep", "x.jsonl", "--grid", "policy=lin_tss"],
            "unknown policy 'lin_tss'; did you mean 'lin_ts'?",
        ),
        (["sweep", "x.jsonl", "--grid", "strategy=cheapest"], "unknown strategy 'cheapest'"),
        (
            ["export-dpo", "--out", "x.jsonl", "--kind", "routes", "--format", "trl"],
            "does not apply to routes",
        ),
        (["demo", "nope.jsonl"], "replay file 'nope.jsonl' does not exist"),
    ],
)
def test_cli_errors_are_one_line_and_status_2(argv, needle, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("GATEWAY_API_KEYS", raising=False)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_a_broken_replay_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n')
    code, _, err = run_cli(["serve", "--replay", str(bad)], capsys)
    assert code == 2 and "bad.jsonl:1: not a replay record" in err and len(err.strip().splitlines()) == 1


def test_the_first_export_of_the_embedding_model_is_quiet(tmp_path):
    code = "import sys, pathlib, gateway.embedders.minilm as e; e.export_onnx(pathlib.Path(sys.argv[1]))"
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "m")],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
        timeout=300,
        check=True,
    )
    assert (tmp_path / "m" / "onnx" / "model.onnx").is_file()
    for noise in ("TracerWarning", "torch_dtype", "heavily recommended", "Exporting the model"):
        assert noise not in run.stderr + run.stdout


# --- finding 4: typos name the closest valid spelling


def test_unknown_router_values_are_400s_that_name_the_closest(fake, gateway):
    settings = make_settings(
        [model("a", fake.url(), capabilities=["chat", "streaming", "tools"]), model("b", fake.url())],
        policies={"code": {"models": ["a", "b"]}},
    )
    gw = gateway(settings)

    def ask(router: dict | None = None, headers: dict | None = None) -> httpx.Response:
        body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
        if router is not None:
            body["router"] = router
        return httpx.post(gw.url + "/v1/chat/completions", json=body, headers=headers or {})

    cases = [
        ({"policy": "cod"}, None, "router.policy", "unknown policy 'cod'; did you mean 'code'?"),
        ({"strategy": "cost_optimised"}, None, "router.strategy", "did you mean 'cost_optimized'?"),
        (
            {"capability": ["toolz"]},
            None,
            "router.capability",
            "unknown capability 'toolz'; did you mean 'tools'?",
        ),
        ({"models": ["aa"]}, None, "router.models", "did you mean 'a'?"),
        ({"stratgy": "bandit"}, None, "router", "unknown field 'stratgy'; did you mean 'strategy'?"),
        (None, {"X-Router-Policy": "nope"}, "router.policy", "unknown policy 'nope'"),
        (None, {"X-Router-Strategy": "round_robbin"}, "X-Router-Strategy", "did you mean 'round_robin'?"),
        (None, {"X-Router-Capability": "visoin"}, "router.capability", "did you mean 'vision'?"),
    ]
    for router, headers, param, message in cases:
        resp = ask(router, headers)
        assert resp.status_code == 400, (router, resp.text)
        error = resp.json()["error"]
        assert error["param"] == param and message in error["message"], error
    assert ask({"policy": "code", "capability": ["tools"]}).status_code == 200


def test_environment_variables_spelt_like_a_setting_are_warned_about():
    env = {"COST_WEIGHTT": "-0.5", "PATH": "/usr/bin", "HOSTNAME": "box", "COST_WEIGHT": "0", "MY_KEY": "x"}
    warnings = env_near_misses(env, Settings.model_fields, ["MY_KEY"])
    assert warnings == ["COST_WEIGHTT is not a setting and is ignored; did you mean COST_WEIGHT?"]


# --- finding 2: a data directory per profile and replay file


def test_each_profile_and_replay_file_keeps_its_own_data(duo, monkeypatch):
    for var in ("DATA_DIR", "MODELS_DIR", "CONFIG_FILE", "DATABASE_URL", "DATABASE_HOST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GATEWAY_API_KEYS", "sk-client")
    dev = load_settings(str(ROOT / "config.dev.yaml"))
    prod = load_settings(str(ROOT / "config.prod.yaml"))
    replay = serve_settings(build_parser().parse_args(["serve", "--replay", str(duo)]))
    replay_dev = serve_settings(
        build_parser().parse_args(["serve", "--replay", str(duo), "--config", "config.dev.yaml"])
    )
    bare = load_settings()
    dirs = [s.data_dir for s in (dev, prod, replay, bare)]
    assert dirs == [Path("data/dev"), Path("data/prod"), Path("data/replay-duo"), Path("data/default")]
    assert replay_dev.data_dir == replay.data_dir  # the file decides, whatever profile lends its knobs
    # the embedding model's export is shared: it is the same model
    assert {s.models_dir for s in (dev, prod, replay, bare)} == {Path("data/models")}
    monkeypatch.setenv("DATA_DIR", "/srv/llm")  # a choice is a choice
    chosen = load_settings(str(ROOT / "config.dev.yaml"))
    assert chosen.data_dir == Path("/srv/llm") and chosen.models_dir == Path("/srv/llm/models")


# --- finding 5: export-dpo explains an empty result


def test_export_routes_says_why_it_wrote_nothing(fake, gateway, dsn, tmp_path, capsys):
    same_price = [
        model("m1", fake.url(answer="Paris."), input_usd_per_mtok=1, output_usd_per_mtok=1),
        model("m2", fake.url(answer="Lyon."), input_usd_per_mtok=1, output_usd_per_mtok=1),
    ]
    gw = gateway(make_settings(same_price, enable_persistence=True, database_url=dsn))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    for name, score in (("m1", 1.0), ("m2", 0.0)):
        rid = httpx.post(gw.url + "/v1/chat/completions", json={"model": name, "messages": messages}).headers[
            "x-request-id"
        ]
        assert httpx.post(gw.url + "/feedback", json={"request_id": rid, "score": score}).status_code == 200
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"models": same_price, "enable_persistence": True, "database_url": dsn}))
    out = tmp_path / "routes.jsonl"
    code, stdout, _ = run_cli(
        ["export-dpo", "--config", str(config), "--out", str(out), "--kind", "routes"], capsys
    )
    assert code == 0 and out.read_text() == ""
    assert "wrote 0 routes records (labels)" in stdout
    assert "1 had two models of the same price" in stdout and "input_usd_per_mtok" in stdout
    # the HTTP export refuses the same combination
    admin = make_settings(
        same_price, enable_persistence=True, database_url=dsn, admin_api_key="sk-admin-0123456789"
    )
    gw2 = gateway(admin)
    resp = httpx.get(
        gw2.url + "/v1/dpo/pairs",
        params={"kind": "routes", "format": "trl"},
        headers={"Authorization": "Bearer sk-admin-0123456789"},
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "format"


# --- finding 6: replay mode, honest and complete


def test_replay_models_claim_only_what_a_replay_can_do(duo, gateway, monkeypatch, tmp_path):
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))  # not ./data/replay-duo of the checkout
    data = load(duo)
    for spec in data.catalogue():
        assert spec.capabilities == {"chat", "streaming"}
        assert 8192 <= spec.context_window < 100_000
    gw = gateway(serve_settings(build_parser().parse_args(["serve", "--replay", str(duo)])))
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    resp = httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "auto", "messages": data.records[0].messages, "tools": tools},
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "router.capability"


def test_every_virtual_model_of_the_profile_works_in_replay_mode(duo, gateway, monkeypatch, tmp_path):
    monkeypatch.delenv("CONFIG_FILE", raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    args = build_parser().parse_args(
        ["serve", "--replay", str(duo), "--config", str(ROOT / "config.dev.yaml")]
    )
    settings = serve_settings(args)
    assert set(settings.virtual_models) == {"auto-cheap", "auto-fast", "auto-quality", "auto-code"}
    gw = gateway(settings)
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    listed = {m.id for m in client.models.list().data}
    messages = load(duo).records[0].messages
    for name in ("auto", *settings.virtual_models):
        assert name in listed
        raw = client.chat.completions.with_raw_response.create(model=name, messages=messages)
        assert raw.http_response.status_code == 200
    # before any feedback every estimate ties: auto-quality takes the dearer model, not the cheapest
    raw = client.chat.completions.with_raw_response.create(model="auto-quality", messages=messages)
    assert raw.headers["x-router-model"] == "dear"
    raw = client.chat.completions.with_raw_response.create(model="auto-cheap", messages=messages)
    assert raw.headers["x-router-model"] == "cheap"


def test_demo_learns_live_and_reports_against_the_best_model(duo, data_dir, st_model, capsys):
    code, out, err = run_cli(
        ["demo", str(duo), "--limit", "40", "--models-dir", str(data_dir / "models")], capsys
    )
    assert code == 0, err
    assert "a replay gateway of duo (2 models) is answering at http://127.0.0.1:" in out
    assert "the best single model is dear" in out
    for half in ("first half", "second half", "all"):
        assert re.search(
            rf"{half} +auto scored [01]\.\d{{3}}: +\d+\.\d% of dear's, at +\d+\.\d% of its cost", out
        )
    assert "second half, auto picked:" in out
    assert "score " in err and "of dear's" in err  # the live line in the progress bar


def test_demo_without_prices_says_cost_is_unknown(tmp_path, data_dir, st_model, capsys):
    records = [
        {
            "id": str(i),
            "messages": [{"role": "user", "content": f"q {i}?"}],
            "outcomes": {"x": outcome(1.0), "y": outcome(0.0)},
        }
        for i in range(6)
    ]
    path = write_replay(tmp_path / "free.jsonl", records)
    code, out, _ = run_cli(["demo", str(path), "--models-dir", str(data_dir / "models")], capsys)
    assert code == 0 and "cost unknown" in out and "nan" not in out


@pytest.mark.skipif(
    not (SHARED / "routerbench_dev.jsonl").is_file(), reason="../shared/data/replay is not here"
)
def test_the_readme_no_key_snippet_works_as_written(gateway, monkeypatch, tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Try it with no API key", 1)[1].split("\n## ", 1)[0]
    commands = "".join(re.findall(r"```bash\n(.*?)```", section, re.S))
    assert "llm-router demo ../shared/data/replay/routerbench_dev.jsonl" in commands
    assert "llm-router serve --replay ../shared/data/replay/routerbench_dev.jsonl" in commands
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ast.parse(snippet)
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("CONFIG_FILE", raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))  # a fresh state, not the checkout's
    args = build_parser().parse_args(["serve", "--replay", "../shared/data/replay/routerbench_dev.jsonl"])
    gw = gateway(serve_settings(args))
    # the snippet as written, on this gateway's port
    exec(compile(snippet.replace("127.0.0.1:8080", f"127.0.0.1:{gw.port}"), "README.md", "exec"), {})


# --- finding 12: the smaller ones


def test_the_readme_constraints_example_runs_against_the_dev_profile(fake, gateway, monkeypatch):
    monkeypatch.delenv("CONFIG_FILE", raising=False)
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Per-request constraints", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    call = ast.parse(code).body[0].value
    body = {k.arg: k.value for k in call.keywords}
    router = ast.literal_eval(body["extra_body"])["router"]
    dev = load_settings(str(ROOT / "config.dev.yaml"), log_level="warning")
    # the dev profile's catalogue, its upstreams played by the fake
    models = [
        m.model_copy(update={"provider": "openai_compatible", "base_url": fake.url(), "api_key_env": None})
        for m in dev.models
    ]
    gw = gateway(dev.model_copy(update={"models": models, "enable_persistence": False}))
    resp = httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "auto", "messages": [{"role": "user", "content": "hi"}], "router": router},
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-router-model"] == "llama-3.3-70b-free"


def test_metrics_have_no_created_series(fake, gateway):
    gw = gateway(make_settings([model("a", fake.url())]))
    assert (
        httpx.post(
            gw.url + "/v1/chat/completions",
            json={"model": "a", "messages": [{"role": "user", "content": "hi"}]},
        ).status_code
        == 200
    )
    text = httpx.get(gw.url + "/metrics").text
    assert "llm_router_requests_total{" in text
    assert "_created" not in text


def test_the_dockerfile_docker_run_starts_the_image_profile(monkeypatch, tmp_path):
    header = (ROOT / "Dockerfile").read_text().split("\nARG ", 1)[0]
    [run] = [line for line in header.splitlines() if "docker run" in line]
    env = dict(re.findall(r"-e ([A-Z_]+)=(\S+)", run))
    assert "GATEWAY_API_KEYS" in env
    for var in ("GATEWAY_API_KEYS", "DATABASE_URL", "DATABASE_SSL_MODE", "DATA_DIR", "CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)  # no .env
    for key, value in {**env, "DATA_DIR": "/data", "MODELS_DIR": "/opt/models"}.items():  # the image's ENV
        monkeypatch.setenv(key, value)
    cmd = (ROOT / "Dockerfile").read_text().split('CMD ["--config", "', 1)[1].split('"', 1)[0]
    settings = load_settings(str(ROOT / "config.prod.yaml"))  # what the image's CMD loads
    assert cmd == "/app/config.prod.yaml" and settings.require_api_keys and settings.gateway_api_keys
