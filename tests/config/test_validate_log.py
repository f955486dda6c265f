"""log.* values that cannot work are one ConfigError naming the key, before anything starts."""
import pytest

from megacpm.config import ConfigError, load_config, validate


@pytest.mark.parametrize("overrides, key", [
    (["--log.profile_steps=[0, 3]"], "log.profile_steps"),
    (["--log.profile_steps=[500]"], "log.profile_steps"),
    ([f"--log.profile_steps={list(range(1, 40))}"], "log.profile_steps"),
    (["--log.wandb=true", "--log.wandb_project=a/b"], "log.wandb_project"),
    (["--log.wandb=true", "--log.wandb_project="], "log.wandb_project"),
    (["--log.wandb_mode=cloud"], "log.wandb_mode"),
])
def test_bad_log_values_name_their_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(load_config("tiny", overrides), check_data=False)


def test_wandb_needs_its_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="log.wandb: needs the wandb package"):
        validate(load_config("tiny", ["--log.wandb=true"]), check_data=False)


def test_good_log_values_pass():
    validate(load_config("tiny", ["--log.profile_steps=[1, 5]", "--log.wandb_mode=offline"]), check_data=False)
