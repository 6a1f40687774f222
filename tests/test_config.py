"""Settings: environment, .env, YAML, and their precedence; the catalogue's checks; the profiles."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


CATALOGUE = """
models:
  - {name: a, base_url: "http://127.0.0.1:1/v1", input_usd_per_mtok: 1, output_usd_per_mtok: 3}
  - {name: b, provider: ollama}
"""


@pytest.mark.parametrize("profile", ["config.dev.yaml", "config.prod.yaml", "config.cost-optimized.yaml"])
def test_profiles_load_with_their_intent(profile, monkeypatch):
    monkeypatch.delenv("EXPLORATION_RATE", raising=False)
    monkeypatch.setenv("GATEWAY_API_KEYS", "sk-client-key")  # prod refuses to start without keys
    s = load_settings(str(ROOT / profile))
    providers = {m.provider for m in s.models}
    assert {"openrouter", "ollama"} <= providers
    if profile == "config.dev.yaml":
        assert s.exploration_rate == 0.3 and s.log_level == "debug" and s.similarity_threshold < 0.7
        assert all(m.input_usd_per_mtok == m.output_usd_per_mtok == 0 for m in s.models)
    if profile == "config.prod.yaml":
        assert s.exploration_rate == 0.05 and s.log_format == "json" and s.enable_persistence
        assert s.database_ssl_mode == "require" and s.latency_weight > 0.2
        assert s.require_api_keys and s.rate_limit_rpm > 0 and s.rate_limit_tpm > 0
    if profile == "config.cost-optimized.yaml":
        assert s.cost_weight == -0.8 and all(
            m.input_usd_per_mtok == m.output_usd_per_mtok == 0 for m in s.models
        )


def test_precedence_cli_env_yaml_default(tmp_path, monkeypatch):
    path = write(tmp_path, CATALOGUE + "exploration_rate: 0.3\nlatency_weight: 0.5\nPORT: 9001\n")
    assert load_settings(path).exploration_rate == 0.3  # yaml beats the default
    assert load_settings(path).port == 9001  # keys are case-insensitive
    monkeypatch.setenv("EXPLORATION_RATE", "0.25")
    s = load_settings(path)
    assert s.exploration_rate == 0.25  # env beats yaml
    assert s.latency_weight == 0.5
    assert s.feedback_weight == 0.6  # the original proxy's default
    assert load_settings(path, port=7000).port == 7000  # command line beats everything


def test_config_file_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CONFIG_FILE", write(tmp_path, CATALOGUE))
    assert [m.name for m in Settings().models] == ["a", "b"]


def test_dotenv_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("COST_WEIGHT=-0.5\nOPENROUTER_API_KEY=sk-or-from-dotenv\n")
    s = Settings()
    assert s.cost_weight == -0.5
    assert s.openrouter_api_key is not None and s.openrouter_api_key.get_secret_value() == "sk-or-from-dotenv"
    assert "sk-or-from-dotenv" not in repr(s)


def test_env_expansion_in_yaml(tmp_path, monkeypatch):
    text = 'models:\n  - {name: o, provider: ollama, base_url: "${MY_OLLAMA:-http://127.0.0.1:11434/v1}"}\n'
    path = write(tmp_path, text)
    assert load_settings(path).models[0].base_url == "http://127.0.0.1:11434/v1"
    monkeypatch.setenv("MY_OLLAMA", "http://ollama:11434/v1")
    assert load_settings(path).models[0].base_url == "http://ollama:11434/v1"


def test_every_documented_variable_is_accepted(monkeypatch):
    env = {
        "FEEDBACK_WEIGHT": "0.7",
        "LATENCY_WEIGHT": "0.1",
        "COST_WEIGHT": "-0.3",
        "EXPLORATION_RATE": "0.2",
        "SIMILARITY_THRESHOLD": "0.8",
        "MAX_SIMILAR_REQUESTS": "20",
        "RECENCY_DAYS": "7",
        "MIN_SIMILAR_REQUESTS": "2",
        "MIN_CONFIDENCE_SCORE": "0.2",
        "OPTIMISTIC_PRIOR": "0.9",
        "EXPLORATION_BONUS": "0.05",
        "MIN_REQUESTS_FOR_GLOBAL": "3",
        "OPENROUTER_API_KEY": "sk-or-x",
        "LLM_MODELS": "a, openai/gpt-4o",
        "DEFAULT_MODEL": "a",
        "HOST": "127.0.0.1",
        "PORT": "8081",
        "CORS_ORIGINS": "https://x.example,https://y.example",
        "ENABLE_PERSISTENCE": "false",
        "DATABASE_URL": "postgres://u:p@db:5432/r",
        "LOG_LEVEL": "warn",
        "LOG_FORMAT": "json",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = Settings(_env_file=None, models=[{"name": "a", "base_url": "http://127.0.0.1:1/v1"}])  # type: ignore[call-arg]
    assert (s.feedback_weight, s.latency_weight, s.cost_weight, s.exploration_rate) == (0.7, 0.1, -0.3, 0.2)
    assert (s.similarity_threshold, s.max_similar_requests, s.recency_days) == (0.8, 20, 7)
    assert (s.min_similar_requests, s.min_confidence_score, s.optimistic_prior) == (2, 0.2, 0.9)
    assert (s.exploration_bonus, s.min_requests_for_global) == (0.05, 3)
    assert [m.name for m in s.models] == ["a", "openai/gpt-4o"]  # LLM_MODELS narrows/extends the catalogue
    assert s.models[1].provider == "openrouter"
    assert s.cors_origins == ["https://x.example", "https://y.example"]
    assert s.database_dsn() == "postgresql+asyncpg://u:p@db:5432/r"
    assert s.port == 8081 and not s.enable_persistence


def test_database_parts(monkeypatch):
    for k, v in {
        "DATABASE_HOST": "db",
        "DATABASE_USER": "u@x",
        "DATABASE_PASSWORD": "p/w",
        "DATABASE_NAME": "r",
    }.items():
        monkeypatch.setenv(k, v)
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert s.database_dsn() == "postgresql+asyncpg://u%40x:p%2Fw@db:5432/r"
    assert "p/w" in s.secrets()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (CATALOGUE + "default_model: c\n", "DEFAULT_MODEL 'c' is not in the model catalogue"),
        ("models: [{name: a, base_url: x}, {name: a, base_url: y}]\n", "duplicate model names"),
        ("models: [{name: a}]\n", "needs base_url"),
        ("models: [{name: a, provider: replay}]\n", "needs replay_file"),
        (CATALOGUE + "policies: {p: {models: [zz]}}\n", "policy 'p': model 'zz' is not in the catalogue"),
        (CATALOGUE + "rules: [{name: r, pattern: x, policy: nope}]\n", "unknown policy 'nope'"),
        (CATALOGUE + "rules: [{name: r, pattern: '(', model: a}]\n", r"missing \), unterminated subpattern"),
        (
            CATALOGUE + "virtual_models: {a: {strategy: cost_optimized}}\n",
            "has the name of a catalogue model",
        ),
        (CATALOGUE + "virtual_models: {x: {strategy: cheapest}}\n", "strategy"),
        (CATALOGUE + "exploration_rate: 2\n", "exploration_rate"),
        ("models: [{name: a, base_url: x, colour: red}]\n", "unknown field 'colour'"),
        # typos name the closest valid spelling (issue 17)
        (CATALOGUE + "cost_weightt: 0\n", "unknown setting 'cost_weightt'; did you mean 'cost_weight'"),
        ("models: [{name: a, base_url: x, input_usd_per_mtk: 1}]\n", "did you mean 'input_usd_per_mtok'"),
        (CATALOGUE + "virtual_models: {x: {strategy: cost_optimised}}\n", "did you mean 'cost_optimized'"),
        (CATALOGUE + "virtual_models: {x: {stratgy: cost_optimized}}\n", "did you mean 'strategy'"),
        (
            CATALOGUE + "policies: {code: {models: [a]}}\nvirtual_models: {x: {policy: cod}}\n",
            "did you mean 'code'",
        ),
        (
            CATALOGUE + "policies: {p: {models: [aa]}}\n",
            "model 'aa' is not in the catalogue; did you mean 'a'",
        ),
        (CATALOGUE + "virtual_models: {v: {capability: [visoin]}}\n", "did you mean 'vision'"),
    ],
)
def test_bad_configuration_is_refused_clearly(tmp_path, text, message):
    with pytest.raises((ValidationError, ValueError), match=message):
        load_settings(write(tmp_path, text))


def test_missing_config_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_settings(str(tmp_path / "nope.yaml"))


def test_model_prices():
    s = Settings(
        _env_file=None,
        models=[
            {
                "name": "a",
                "base_url": "http://x/v1",  # type: ignore[call-arg]
                "input_usd_per_mtok": 2.0,
                "output_usd_per_mtok": 8.0,
            }
        ],
    )
    assert s.models[0].cost_usd(1000, 500) == pytest.approx(0.006)
    assert s.default_model == "a"


def test_env_example_lists_every_scalar_setting():
    import re

    text = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, flags=re.MULTILINE))
    structured = {"models", "rules", "routes", "policies", "virtual_models"}
    fields = {name.upper() for name in Settings.model_fields if name not in structured}
    assert fields - listed == set()


def test_env_example_values_parse(tmp_path, monkeypatch):
    # every commented default, uncommented, is accepted as it is written
    lines = []
    for line in (ROOT / ".env.example").read_text().splitlines():
        stripped = line.lstrip("# ").strip()
        if "=" in stripped and stripped.split("=", 1)[0].isupper() and not stripped.startswith("CONFIG_FILE"):
            lines.append(stripped)
    (tmp_path / ".env").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CONFIG_FILE", raising=False)
    s = Settings(models=[{"name": "a", "base_url": "http://127.0.0.1:1/v1"}])  # type: ignore[call-arg]
    assert s.router_policy == "hcts" and s.exploration_rate == 0.02 and s.neighbours_per_arm == 30
    assert s.router_dial_mode == "budget" and s.router_dial_target == 0.35


def test_the_dial_defaults_to_budget_and_a_mode_alone_takes_its_own_target(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CONFIG_FILE", raising=False)
    m = [{"name": "a", "base_url": "http://127.0.0.1:1/v1"}]

    def dial(**kw):
        s = Settings(models=m, **kw)  # type: ignore[call-arg]
        return s.router_dial_mode, s.router_dial_target

    assert dial() == ("budget", 0.35)  # README: The dial (why budget 0.35)
    assert dial(router_dial_mode="quality") == ("quality", 0.95)  # not a quality target of 0.35
    assert dial(router_dial_mode="usd") == ("usd", 0.001)
    assert dial(router_dial_target=0.5) == ("budget", 0.5)
    assert dial(router_dial_mode="quality", router_dial_target=0.9) == ("quality", 0.9)
    monkeypatch.setenv("ROUTER_DIAL_MODE", "quality")
    assert dial() == ("quality", 0.95)
    with pytest.raises(ValidationError):
        dial(router_dial_target=3.0)  # a quality target is a share of the best model's quality
