"""Unit tests for ``olladmr.fleet.models``: ``normalise_model``, the routing key of a model name."""

from __future__ import annotations

import string

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from support import FAST

from olladmr.fleet.models import normalise_model


SMOLLM2_ALIASES = [
    "smollm2",
    "ai/smollm2",
    "ai/smollm2:latest",
    "AI/SmolLM2",
    "AI/SMOLLM2",
    " ai/smollm2 ",
    "\tai/smollm2\n",
    "smollm2:",
    "docker.io/ai/smollm2",
    "index.docker.io/ai/smollm2:latest",
    "registry-1.docker.io/ai/smollm2",
    "DOCKER.IO/AI/SMOLLM2:latest",
]


@pytest.mark.parametrize("alias", SMOLLM2_ALIASES)
def test_normalise_aliases_of_one_model_are_equal(alias: str) -> None:
    """Every spelling DMR treats as ai/smollm2:latest gets the same routing key."""
    assert normalise_model(alias) == normalise_model("smollm2") == "ai/smollm2:latest"


@pytest.mark.parametrize(
    "other", ["smollm2:LATEST", "myorg/smollm2", "ai/smollm2:360M", "ai/smollm3", "hf.co/ai/smollm2"]
)
def test_normalise_distinct_models_differ(other: str) -> None:
    """Another tag (tags are case-sensitive), namespace or registry is another model."""
    assert normalise_model(other) != normalise_model("ai/smollm2")


def test_normalise_hugging_face_short_host() -> None:
    """``hf.co/`` is ``huggingface.co/``; the repository is case-insensitive, the tag is not."""
    assert normalise_model("hf.co/Org/Repo:Q4") == normalise_model("huggingface.co/org/repo:Q4")
    assert normalise_model("hf.co/Org/Repo:Q4") == "huggingface.co/org/repo:Q4"
    assert normalise_model("HF.CO/org/repo") == "huggingface.co/org/repo:latest"
    assert normalise_model("hf.co/org/repo:q4") != normalise_model("hf.co/org/repo:Q4")


def test_normalise_keeps_other_registries_and_ports() -> None:
    """A non-Docker-Hub registry (with or without a port) stays part of the key."""
    assert normalise_model("ghcr.io/Org/Model:v1") == "ghcr.io/org/model:v1"
    assert normalise_model("localhost:5000/m") == "localhost:5000/m:latest"
    assert normalise_model("localhost:5000/m:Q4") == "localhost:5000/m:Q4"


def test_normalise_leaves_ids_alone() -> None:
    """12- and 64-hex IDs and ``sha256:`` digests are keys as they are (only trimmed)."""
    short = "0123456789ab"
    full = "0123456789abcdef" * 4
    assert normalise_model(short) == short
    assert normalise_model(f" {full} ") == full
    assert normalise_model(f"sha256:{full}") == f"sha256:{full}"


def test_normalise_docker_hub_prefix_before_another_registry_is_idempotent() -> None:
    """A Docker Hub repository whose first segment looks like a registry keeps its Hub prefix, so its key is stable."""
    for name in ("docker.io/docker.io/x", "docker.io/hf.co/x", "index.docker.io/ghcr.io/a/b:T"):
        key = normalise_model(name)
        assert normalise_model(key) == key
    assert normalise_model("docker.io/hf.co/x") != normalise_model("hf.co/x")
    assert normalise_model("index.docker.io/hf.co/x") == normalise_model("docker.io/hf.co/x")


_HEX_ID_CHARS = frozenset("0123456789abcdef")


def _looks_like_id(text: str) -> bool:
    text = text.strip()
    hexpart = text[len("sha256:") :] if text.startswith("sha256:") else text
    return len(hexpart) in (12, 64) and set(hexpart) <= _HEX_ID_CHARS


NAME_CHARS = string.ascii_letters + string.digits + "._-"
segment = st.text(alphabet=NAME_CHARS, min_size=1, max_size=10)
registry_prefix = st.sampled_from(
    [
        "docker.io/",
        "index.docker.io/",
        "registry-1.docker.io/",
        "hf.co/",
        "HF.CO/",
        "huggingface.co/",
        "ghcr.io/",
        "localhost:5000/",
    ]
)
model_names = st.builds(
    lambda pad1, registries, spaces, name, tag, pad2: (
        pad1 + "".join(registries) + "".join(s + "/" for s in spaces) + name + tag + pad2
    ),
    st.sampled_from(["", " ", "\t", " \n "]),  # padding
    st.lists(registry_prefix, max_size=2),  # registries (two in a row are rare but legal)
    st.lists(segment, max_size=2),  # namespaces
    segment,  # repository
    st.one_of(st.just(""), st.just(":"), st.text(alphabet=NAME_CHARS, min_size=1, max_size=8).map(lambda t: ":" + t)),
    st.sampled_from(["", " ", "\n"]),  # padding
)


@FAST
@given(name=st.one_of(model_names, st.text(max_size=40)))
def test_normalise_is_idempotent(name: str) -> None:
    """Normalising a routing key again gives the same key."""
    key = normalise_model(name)
    assert normalise_model(key) == key


@FAST
@given(name=model_names)
def test_normalise_result_always_has_a_tag(name: str) -> None:
    """Every non-ID key ends in an explicit tag (``latest`` when none or an empty one was given)."""
    assume(not _looks_like_id(name))
    key = normalise_model(name)
    assert key.rfind(":") > key.rfind("/")
    if ":" not in name.strip().rsplit("/", 1)[-1] or name.strip().endswith(":"):
        assert key.endswith(":latest")


@FAST
@given(repo=segment, tag=st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=8))
def test_normalise_name_case_insensitive_tag_case_sensitive(repo: str, tag: str) -> None:
    """Changing the case of the name keeps the key; the tag is kept exactly as given."""
    assume(not _looks_like_id(repo) and not _looks_like_id(repo.lower()))
    assert normalise_model(f"{repo.upper()}:{tag}") == normalise_model(f"{repo.lower()}:{tag}")
    assert normalise_model(f"{repo}:{tag}").endswith(":" + tag)
    assert normalise_model(f"ai/{repo}") == normalise_model(f"docker.io/ai/{repo}:latest") == normalise_model(repo)
