import pytest

from tests.train.helpers import make_dataset, save_init, tiny_config, write_config


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("train_data"))


@pytest.fixture(scope="session")
def tiny_moe(tiny_data, tmp_path_factory):
    """(config path, init weights path) of the hash + MPO + Switch test model."""
    d = tmp_path_factory.mktemp("tiny_moe")
    cfg = write_config(tiny_config(*tiny_data, d / "run"), d / "tiny.yaml")
    return cfg, save_init(cfg, d / "init.safetensors")
