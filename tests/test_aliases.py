"""Unit tests for model aliases: ``olladmr.fleet.aliases``, alias routing in ``routing`` and aliases in ``catalogue``."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from olladmr.config import Config, parse_config
from olladmr.errors import ClientError
from olladmr.fleet.aliases import Alias, Aliases
from olladmr.fleet.catalogue import Catalogue
from olladmr.fleet.models import normalise_model
from olladmr.fleet.routing import RoutingDecision, route
from olladmr.fleet.state import EndpointState, Fleet

ALIAS = "gpt-4o-mini"
TARGETS = ["ai/smollm2", "ai/llama3.2"]


def config(aliases: dict[str, list[str]] | None = None, names: tuple[str, ...] = ("a", "b", "c")) -> Config:
    """Endpoints ``names`` and ``model_aliases`` (default: gpt-4o-mini -> smollm2, llama3.2)."""
    return parse_config(
        {
            "model_aliases": {ALIAS: TARGETS} if aliases is None else aliases,
            "endpoints": [{"name": n, "url": f"http://{n}.test:1", "priority": 100 - i} for i, n in enumerate(names)],
        },
        "t",
    )


def model(model_id: str, owned_by: str = "docker", created: int = 1) -> dict[str, object]:
    return {"id": model_id, "object": "model", "owned_by": owned_by, "created": created}


class World:
    """A fleet, its alias table and catalogue, built from one config on a Clock."""

    def __init__(self, cfg: Config | None = None) -> None:
        self.config = cfg or config()
        self.clock = Clock()
        self.fleet = Fleet(self.config, self.clock)
        self.aliases = Aliases(self.config)
        self.catalogue = Catalogue(self.fleet, self.aliases)

    def ep(self, name: str) -> EndpointState:
        ep = self.fleet.get(name)
        assert ep is not None
        return ep

    def serve(self, name: str, *models: dict[str, object] | str, status: str = "healthy") -> EndpointState:
        """Endpoint ``name`` in ``status``, listing ``models`` (ids or full model objects)."""
        ep = self.ep(name)
        ep.status = status
        ep.status_reason = "test"
        ep.set_models([m if isinstance(m, dict) else model(m) for m in models])
        return ep

    def route_alias(self, name: str = ALIAS) -> RoutingDecision:
        key = normalise_model(name)
        return route(self.fleet, name, key, self.aliases.get(key))


def candidate_names(decision: RoutingDecision) -> list[str]:
    return [ep.name for ep in decision.candidates]


# -- the table


def test_the_table_holds_each_alias_with_its_targets_and_their_routing_keys() -> None:
    """An alias is found by its routing key and keeps its targets as written, in order, with their keys."""
    aliases = Aliases(config())
    assert aliases.get(normalise_model(ALIAS)) == Alias(
        name="gpt-4o-mini",
        targets=("ai/smollm2", "ai/llama3.2"),
        keys=("ai/smollm2:latest", "ai/llama3.2:latest"),
    )
    assert aliases.get(normalise_model("GPT-4o-Mini:latest")) is aliases.get(normalise_model(ALIAS))
    assert aliases.get(ALIAS) is None  # lookups take routing keys, not raw names
    assert aliases.get(None) is None
    assert aliases.get(normalise_model("ai/smollm2")) is None  # a target is not an alias
    assert bool(aliases) is True


def test_an_empty_table_is_false_and_finds_nothing() -> None:
    """Without ``model_aliases`` the table is falsy, empty and answers None."""
    aliases = Aliases(config(aliases={}))
    assert (bool(aliases), list(aliases), aliases.get(normalise_model(ALIAS))) == (False, [], None)


def test_iterating_gives_the_aliases_in_configuration_order() -> None:
    """Aliases iterate in the order the configuration lists them."""
    aliases = Aliases(config(aliases={"z-alias": ["ai/gemma3"], "claude-sonnet-4": ["ai/qwen3"], ALIAS: TARGETS}))
    assert [a.name for a in aliases] == ["z-alias", "claude-sonnet-4", "gpt-4o-mini"]


def test_reconfigure_replaces_the_whole_table() -> None:
    """After a reload the old aliases are gone and the new ones (with their new targets) are in force."""
    aliases = Aliases(config())
    seen = list(aliases)
    aliases.reconfigure(config(aliases={"claude-sonnet-4": ["ai/qwen3", "ai/smollm2"]}))
    assert aliases.get(normalise_model(ALIAS)) is None
    assert aliases.get(normalise_model("claude-sonnet-4")) == Alias(
        "claude-sonnet-4", ("ai/qwen3", "ai/smollm2"), ("ai/qwen3:latest", "ai/smollm2:latest")
    )
    assert [a.name for a in aliases] == ["claude-sonnet-4"]
    assert [a.name for a in seen] == ["gpt-4o-mini"]  # an earlier iteration is a snapshot
    aliases.reconfigure(config(aliases={ALIAS: ["ai/gemma3"]}))
    assert aliases.get(normalise_model(ALIAS)) == Alias(ALIAS, ("ai/gemma3",), ("ai/gemma3:latest",))
    aliases.reconfigure(config(aliases={}))
    assert (bool(aliases), list(aliases)) == (False, [])


# -- routing an alias


def test_an_alias_routes_to_every_routable_holder_with_its_first_listed_target() -> None:
    """Each routable endpoint listing one of the alias's models is a candidate, named by the first (alias order) it lists."""
    w = World(config(names=("a", "b", "c", "d")))
    w.serve("a", "ai/llama3.2:latest")
    w.serve("b", "ai/llama3.2", "AI/SmolLM2:latest", "ai/gemma3")  # lists both: smollm2 comes first in the alias
    w.serve("c", "ai/gemma3")
    w.serve("d", "docker.io/ai/smollm2", status="busy")
    decision = w.route_alias()
    assert candidate_names(decision) == ["a", "b", "d"]
    assert decision.names == {"a": "ai/llama3.2:latest", "b": "AI/SmolLM2:latest", "d": "docker.io/ai/smollm2"}
    assert (decision.strategy, decision.decision, decision.reason) == ("model-aware", "routed", "alias")
    assert decision.headers()[b"x-olla-routing-reason"] == b"alias"


def test_an_alias_is_resolved_by_any_spelling_of_its_name() -> None:
    """A request naming the alias in another case or with the default tag routes the same way."""
    w = World()
    w.serve("a", "ai/smollm2:latest")
    decision = w.route_alias("GPT-4o-Mini:latest")
    assert (candidate_names(decision), decision.names) == (["a"], {"a": "ai/smollm2:latest"})


@pytest.mark.parametrize("how", ["offline", "unhealthy", "unknown", "breaker_open", "removed"])
def test_an_unroutable_holder_is_skipped(how: str) -> None:
    """A holder that is not routable (down, unknown, breaker open, removed) is neither a candidate nor named."""
    w = World()
    a = w.serve("a", "ai/smollm2:latest", status="offline" if how == "offline" else "healthy")
    if how in ("unhealthy", "unknown"):
        a.status = how
    elif how == "breaker_open":
        for _ in range(5):
            a.breaker.on_failure()
        assert a.breaker.state == "open"
    elif how == "removed":
        a.remove()
    w.serve("b", "ai/llama3.2:latest")
    w.serve("c", "ai/gemma3")
    assert a.routable is False
    decision = w.route_alias()
    assert (candidate_names(decision), decision.names, decision.reason) == (["b"], {"b": "ai/llama3.2:latest"}, "alias")


def test_without_a_holder_the_alias_is_routed_as_a_plain_model() -> None:
    """When nobody lists the alias's models, an endpoint that lists a model named like the alias gets it, unrenamed."""
    w = World()
    w.serve("a", "ai/gemma3")
    w.serve("b", "ai/gpt-4o-mini:latest")
    decision = w.route_alias()
    assert (candidate_names(decision), decision.names) == (["b"], {})
    assert (decision.decision, decision.reason) == ("routed", "model_found")


def test_without_a_holder_or_a_model_of_that_name_the_alias_is_not_found() -> None:
    """An alias nobody can serve is a 404 model_not_found naming the models that are available."""
    w = World()
    w.serve("a", "ai/gemma3")
    w.serve("b", "ai/qwen3")
    with pytest.raises(ClientError) as caught:
        w.route_alias()
    error = caught.value
    assert (error.status, error.code) == (404, "model_not_found")
    assert "'gpt-4o-mini'" in error.message
    assert error.message.endswith("available models: ai/gemma3, ai/qwen3")
    assert error.headers[b"x-olla-routing-decision"] == b"rejected"


def test_without_a_holder_a_lazy_endpoint_gets_the_alias_unrenamed() -> None:
    """With no holder, a routable endpoint whose models are not known yet is the fallback, with no rename."""
    w = World()
    w.serve("a", "ai/gemma3")
    b = w.ep("b")
    b.status = "healthy"  # models never fetched
    decision = w.route_alias()
    assert (candidate_names(decision), decision.names) == (["b"], {})
    assert decision.reason == "model_not_listed_lazy_endpoint"


def test_a_lazy_endpoint_is_not_a_candidate_while_a_holder_is_routable() -> None:
    """An endpoint with unknown models is left out when a routable endpoint lists one of the alias's models."""
    w = World()
    w.serve("a", "ai/llama3.2")
    w.ep("b").status = "healthy"
    decision = w.route_alias()
    assert (candidate_names(decision), decision.names) == (["a"], {"a": "ai/llama3.2"})


def test_with_every_endpoint_down_an_alias_gets_model_unavailable() -> None:
    """With nothing routable, an alias request is a 503 model_unavailable, as a request for its models is."""
    w = World()
    w.serve("a", "ai/smollm2", status="offline")
    w.serve("b", "ai/llama3.2", status="unhealthy")
    w.serve("c", "ai/gemma3", status="offline")
    with pytest.raises(ClientError) as caught:
        w.route_alias()
    assert (caught.value.status, caught.value.code) == (503, "model_unavailable")
    assert caught.value.headers[b"retry-after"]


def test_an_alias_whose_holders_are_all_unroutable_is_unavailable_not_unknown() -> None:
    """An alias served only by endpoints that are down right now answers 503 model_unavailable, like its models do."""
    w = World()
    w.serve("a", "ai/smollm2", status="offline")
    w.serve("b", "ai/gemma3")
    with pytest.raises(ClientError) as real:
        route(w.fleet, "ai/smollm2", normalise_model("ai/smollm2"))
    assert (real.value.status, real.value.code) == (503, "model_unavailable")
    with pytest.raises(ClientError) as caught:
        w.route_alias()
    assert (caught.value.status, caught.value.code) == (503, "model_unavailable")


def test_routing_a_real_model_ignores_the_alias_table() -> None:
    """A request for a real target model routes as that model, with no rename."""
    w = World()
    w.serve("a", "ai/smollm2")
    w.serve("b", "ai/llama3.2")
    decision = w.route_alias("ai/llama3.2")
    assert (candidate_names(decision), decision.names, decision.reason) == (["b"], {}, "model_found")


def test_routing_follows_a_reloaded_table() -> None:
    """After ``Aliases.reconfigure``, the alias routes to the new targets' holders."""
    w = World()
    w.serve("a", "ai/smollm2")
    w.serve("b", "ai/qwen3:8B")
    assert candidate_names(w.route_alias()) == ["a"]
    w.aliases.reconfigure(config(aliases={ALIAS: ["ai/qwen3:8B"]}))
    decision = w.route_alias()
    assert (candidate_names(decision), decision.names) == (["b"], {"b": "ai/qwen3:8B"})


# -- the catalogue


def test_openai_list_adds_each_served_alias_with_its_first_served_model_s_owner() -> None:
    """The model list ends with each alias whose models are served, owned and dated like its first served target."""
    w = World()
    w.serve("a", model("ai/llama3.2:latest", "meta", 5), model("ai/gemma3", "google", 7))
    w.serve("b", model("ai/smollm2:latest", "docker", 1))  # first in alias order, though listed after llama
    listed = w.catalogue.openai_list()
    assert [m["id"] for m in listed] == ["ai/llama3.2:latest", "ai/gemma3", "ai/smollm2:latest", "gpt-4o-mini"]
    assert listed[-1] == {"id": "gpt-4o-mini", "object": "model", "created": 1, "owned_by": "docker"}


def test_openai_list_falls_back_to_the_next_target_when_the_first_is_not_served() -> None:
    """With the first target only on an unroutable endpoint, the alias takes the next served target's owner."""
    w = World()
    w.serve("a", model("ai/smollm2", "docker", 1), status="offline")
    w.serve("b", model("ai/llama3.2", "meta", 5))
    listed = w.catalogue.openai_list()
    assert [m["id"] for m in listed] == ["ai/llama3.2", "gpt-4o-mini"]
    assert listed[-1] == {"id": "gpt-4o-mini", "object": "model", "created": 5, "owned_by": "meta"}


def test_openai_list_defaults_an_alias_s_owner_and_date() -> None:
    """A served target without ``owned_by``/``created`` gives the alias ``docker`` and 0."""
    w = World()
    w.serve("a", {"id": "ai/smollm2", "object": "model"})
    assert w.catalogue.openai_list()[-1] == {"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "docker"}


def test_openai_list_leaves_out_an_alias_nobody_serves() -> None:
    """An alias none of whose models is on a routable endpoint is not listed."""
    w = World()
    w.serve("a", "ai/gemma3")
    w.serve("b", "ai/smollm2", status="offline")
    assert [m["id"] for m in w.catalogue.openai_list()] == ["ai/gemma3"]


def test_openai_list_does_not_duplicate_an_alias_that_is_also_a_real_model() -> None:
    """When an endpoint lists a model named like the alias, only that real model is listed."""
    w = World()
    w.serve("a", model("ai/smollm2"), model("ai/gpt-4o-mini", "someone", 9))
    listed = w.catalogue.openai_list()
    assert [m["id"] for m in listed] == ["ai/smollm2", "ai/gpt-4o-mini"]
    assert listed[1]["owned_by"] == "someone"


def test_anthropic_list_includes_the_alias() -> None:
    """The Anthropic-shaped model list carries the alias after the real models."""
    w = World()
    w.serve("a", model("ai/smollm2", created=86400))
    data = w.catalogue.anthropic_list()["data"]
    assert [(m["id"], m["created_at"]) for m in data] == [
        ("ai/smollm2", "1970-01-02T00:00:00Z"),
        ("gpt-4o-mini", "1970-01-02T00:00:00Z"),
    ]


def test_olla_model_of_an_alias_lists_its_targets_and_every_holder() -> None:
    """``olla_model(alias)`` names the targets (``alias_of``) and every holder with the id it lists, routable or not."""
    w = World()
    w.serve("a", "ai/llama3.2:latest", "ai/smollm2", status="offline")
    w.serve("b", "ai/gemma3")
    w.serve("c", "ai/llama3.2")
    entry = w.catalogue.olla_model(ALIAS)
    assert entry == {
        "id": "gpt-4o-mini",
        "key": "ai/gpt-4o-mini:latest",
        "object": "model",
        "alias_of": ["ai/smollm2", "ai/llama3.2"],
        "endpoints": [
            {"name": "a", "status": "offline", "routable": False, "id": "ai/smollm2"},
            {"name": "c", "status": "healthy", "routable": True, "id": "ai/llama3.2"},
        ],
        "available": True,
    }
    assert w.catalogue.olla_model("GPT-4O-MINI:latest") == entry


def test_olla_model_of_an_alias_with_only_unroutable_holders_is_unavailable() -> None:
    """An alias whose holders are all down is shown, but not available; one with no holder has no endpoints."""
    w = World()
    w.serve("a", "ai/smollm2", status="offline")
    entry = w.catalogue.olla_model(ALIAS)
    assert entry is not None
    assert (entry["endpoints"], entry["available"]) == (
        [{"name": "a", "status": "offline", "routable": False, "id": "ai/smollm2"}],
        False,
    )
    w.serve("a", "ai/gemma3")
    entry = w.catalogue.olla_model(ALIAS)
    assert entry is not None
    assert (entry["endpoints"], entry["available"], entry["alias_of"]) == ([], False, TARGETS)


def test_olla_model_prefers_a_real_model_named_like_the_alias() -> None:
    """When a model named like the alias exists, ``olla_model`` returns that model, not the alias."""
    w = World()
    w.serve("a", "ai/gpt-4o-mini", "ai/smollm2")
    entry = w.catalogue.olla_model(ALIAS)
    assert entry is not None
    assert entry["id"] == "ai/gpt-4o-mini"
    assert "alias_of" not in entry


def test_olla_model_of_an_unknown_name_is_none() -> None:
    """Neither a model nor an alias: None."""
    w = World()
    w.serve("a", "ai/smollm2")
    assert w.catalogue.olla_model("gpt-5") is None


def test_olla_list_entries_name_the_aliases_that_point_at_them() -> None:
    """Every model entry lists the aliases (in configuration order) that have it as a target, else none."""
    w = World(config(aliases={ALIAS: TARGETS, "claude-sonnet-4": ["ai/qwen3", "AI/SmolLM2:latest"]}))
    w.serve("a", "ai/smollm2:latest", "ai/gemma3")
    w.serve("b", "ai/llama3.2", "ai/qwen3")
    w.serve("c", "ai/qwen3", status="offline")
    listing = w.catalogue.olla_list()
    assert [(e["key"], e["aliases"]) for e in listing["data"]] == [
        ("ai/gemma3:latest", []),
        ("ai/llama3.2:latest", ["gpt-4o-mini"]),
        ("ai/qwen3:latest", ["claude-sonnet-4"]),
        ("ai/smollm2:latest", ["gpt-4o-mini", "claude-sonnet-4"]),
    ]
    assert listing["total"] == 4
    qwen = listing["data"][2]
    assert [(e["name"], e["routable"]) for e in qwen["endpoints"]] == [("b", True), ("c", False)]


def test_olla_list_after_a_reload_shows_the_new_aliases() -> None:
    """Entries' ``aliases`` follow the reloaded table."""
    w = World()
    w.serve("a", "ai/smollm2")
    w.aliases.reconfigure(config(aliases={"other": ["ai/smollm2"]}))
    assert [(e["id"], e["aliases"]) for e in w.catalogue.olla_list()["data"]] == [("ai/smollm2", ["other"])]
    assert w.catalogue.olla_model(ALIAS) is None
    assert [m["id"] for m in w.catalogue.openai_list()] == ["ai/smollm2", "other"]

