import os

# Eight simulated CPU devices for the multi-device tests (mesh, collectives). Must be set
# before JAX initialises its backend; single-device code keeps using device 0.
os.environ["XLA_FLAGS"] = " ".join(
    filter(None, [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"])
) if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "") \
    else os.environ["XLA_FLAGS"]
