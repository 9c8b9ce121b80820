import os

# Eight simulated CPU devices for the multi-device tests (mesh, collectives). Must be set
# before JAX initialises its backend; single-device code keeps using device 0.
os.environ["XLA_FLAGS"] = " ".join(
    filter(None, [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"])
) if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "") \
    else os.environ["XLA_FLAGS"]

import pytest  # noqa: E402

from hpllm.cache import cache_dir  # noqa: E402  (plain paths: imports no JAX)

# What hpllm builds or measures in its cache (the C++ kernels, hardware.json, prepared
# corpora, distilled drafts) starts empty each session, so no run depends on what an earlier
# one left behind and no test writes figures measured on a busy machine into the user's
# cache. Downloads (models, datasets) are the same bytes wherever they come from: those
# folders stay the user's, fetched once.
DOWNLOADS = ("models", "datasets")


@pytest.fixture(scope="session", autouse=True)
def fresh_hpllm_cache(tmp_path_factory):
    """$HPLLM_CACHE for the session (and the subprocesses tests start), under pytest's
    temporary root, which pytest prunes to the last few runs."""
    user, session = cache_dir(), tmp_path_factory.mktemp("hpllm-cache")
    for name in DOWNLOADS:
        (user / name).mkdir(parents=True, exist_ok=True)
        (session / name).symlink_to(user / name, target_is_directory=True)
    # Known figures instead of a measurement in every process that needs the CPU's peaks
    # (MFU, roofline): measuring takes 20-40 s and, with the suite itself loading the cores,
    # is never cached, so each subprocess measured again. tests/test_hardware.py tests the
    # measurement itself in caches of its own.
    from known_hardware import write_known_figures  # imports JAX: after XLA_FLAGS above

    write_known_figures(session, 8, **{f"all_gather_bandwidth_{n}dev": 1e9 for n in (2, 4)})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HPLLM_CACHE", str(session))
        yield session
