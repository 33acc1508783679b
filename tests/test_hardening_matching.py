"""Issue 15, item 2: exact-match normalization never merges prompts that mean different things.

NFKC folded compatibility characters into plain ones, so "What is 5²+3?" had the entry id of "What is 52+3?" and
was an exact hit of it. Normalization is now canonical only (NFC), lower case, whitespace collapsed and trailing
"?" / "." dropped ("!" only after a word: "5!" is a factorial). These tests hold a list of confusables that must
stay apart and a list of true equivalents that must still merge, and run both through the real read path.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata

import pytest

from cache_core.cache import SemanticCache
from cache_core.index import IndexSpec, ensure_index
from cache_core.schema import Scope, WriteCommand, entry_id, normalize_prompt
from cache_core.store import build_entry, write_entry, write_command

# (stored prompt, another prompt that means something else)
CONFUSABLES = [
    ("What is 5²+3?", "What is 52+3?"),  # superscript
    ("What is 10³?", "What is 103?"),
    ("What is x₂?", "What is x2?"),  # subscript
    ("What is H₂O?", "What is H2O?"),
    ("What is 5½ times 2?", "What is 51⁄2 times 2?"),  # vulgar fraction / fraction slash
    ("What is ¼ of 8?", "What is 1⁄4 of 8?"),
    ("Convert ５ km to miles", "Convert 5 km to miles"),  # full-width digit
    ("What is １２ squared?", "What is 12 squared?"),
    ("Define the ﬁ ligature", "Define the fi ligature"),  # ligatures
    ("Is Straße spelled with ß?", "Is Strasse spelled with ss?"),
    ("What is ①?", "What is 1?"),  # circled digit
    ("What is 2ⁿ?", "What is 2n?"),
    ("What is ℌ in math?", "What is H in math?"),  # mathematical letter
    ("How much is 3 ㎏?", "How much is 3 kg?"),  # squared unit symbol
    ("What is 5!", "What is 5?"),  # factorial
    ("What is 10!?", "What is 10?"),
]

# (stored prompt, the same request typed differently)
EQUIVALENTS = [
    ("What is the capital of France?", "  what   is the Capital of FRANCE?? "),
    ("What is the capital of France?", "What is the capital of France"),
    ("What is the capital of France?", "What is the\tcapital\nof France."),
    ("What is the capital of France?", "What\u00a0is the capital of France?"),  # no-break space
    ("東京の天気は？", "東京の天気は"),  # full-width question mark (CJK)
    ("日本 の 首都", "日本\u3000の\u3000首都"),  # ideographic space
    ("Café opening hours", unicodedata.normalize("NFD", "Café opening hours")),  # composed / decomposed
    ("Tell me a joke!", "tell me a joke"),
]


@pytest.mark.parametrize("stored, other", CONFUSABLES)
def test_confusables_keep_their_own_normal_form_and_entry_id(stored, other):
    assert normalize_prompt(stored) != normalize_prompt(other)
    assert entry_id(stored, Scope(tenant="t")) != entry_id(other, Scope(tenant="t"))


@pytest.mark.parametrize("stored, other", EQUIVALENTS)
def test_true_equivalents_still_share_one_entry_id(stored, other):
    assert entry_id(stored, Scope(tenant="t")) == entry_id(other, Scope(tenant="t"))


@pytest.fixture
def cache(settings, redis_client, embedder):
    ensure_index(redis_client, IndexSpec(settings=settings, dim=embedder.dim, model_name=embedder.name))
    return SemanticCache(settings, redis_client, embedder)


def test_a_confusable_is_never_an_exact_hit_of_the_other(cache, settings, redis_client, embedder):
    for n, (stored, other) in enumerate(CONFUSABLES):
        scope = Scope(tenant=f"c{n}")
        write_command(redis_client, settings, embedder, WriteCommand(prompt=stored, response="A", scope=scope))
        assert cache.lookup(stored, scope).strategy == "exact"
        found = cache.lookup(other, scope)
        assert found.strategy != "exact", (stored, other)  # before the fix: an exact hit for every one of them


def test_true_equivalents_are_exact_hits(cache, settings, redis_client, embedder):
    for n, (stored, other) in enumerate(EQUIVALENTS):
        scope = Scope(tenant=f"e{n}")
        write_command(redis_client, settings, embedder, WriteCommand(prompt=stored, response="A", scope=scope))
        found = cache.lookup(other, scope)
        assert found.hit and found.strategy == "exact", (stored, other)


def _nfkc_entry_id(prompt: str, scope: Scope) -> str:
    """The entry id the old normalization (NFKC, case-folded) gave: what documents written before the fix carry."""
    text = " ".join(unicodedata.normalize("NFKC", prompt).casefold().split()).rstrip(" .!?。？！")
    material = json.dumps([text, scope.tenant, scope.locale, scope.model, sorted(scope.extra.items())],
                          ensure_ascii=False)
    return hashlib.sha256(material.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def test_an_entry_written_under_the_old_merged_id_does_not_answer_the_other_prompt(cache, settings, redis_client,
                                                                                   embedder):
    """An entry stored before the fix for "What is 5²+3?" sits under the id the ASCII prompt "What is 52+3?" still
    has (ASCII prompts kept their ids). The exact path checks the stored prompt, so it is no exact hit of it."""
    scope = Scope(tenant="legacy")
    stored, other = "What is 5²+3?", "What is 52+3?"
    assert _nfkc_entry_id(stored, scope) == entry_id(other, scope)  # the old collision, as stored documents have it
    entry = build_entry(WriteCommand(prompt=stored, response="28", scope=scope), settings=settings,
                        embedding=embedder.embed([stored])[0].tolist())
    entry = entry.model_copy(update={"id": _nfkc_entry_id(stored, scope)})
    write_entry(redis_client, settings, entry)
    assert cache.lookup(other, scope).strategy != "exact"
