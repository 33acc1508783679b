"""The safety pipeline: pluggable checks that flag a write and decide to approve it, hold it for review or drop it.

Every check looks at one :class:`~cache_core.schema.WriteCommand` (with the policy of its tenant) and returns
:class:`Finding` s; the pipeline merges them into one :class:`Verdict`: the strictest decision wins
(drop > hold > approve), every flag is kept with its reason, and a ``short_ttl`` finding caps the entry's TTL.

Default checks, in order (each can be configured per deployment in the settings and per tenant in the policy file):

==================  =================================================================  ======================
check               what it flags                                                      default action
==================  =================================================================  ======================
``nonanswer``       empty/whitespace responses, provider error payloads, responses     drop (always)
                    cut off by a token limit or a provider's content filter
``refusal``         "I'm sorry, but I can't ...", "As an AI language model, I ..."     drop
``pii``             e-mail addresses, phone numbers, card numbers (Luhn), IBANs        hold
                    (mod 97), US SSN / UK NINO, in the prompt or the response
``prompt``          personal prompts ("my order", "my account", ...)                   drop
                    time-sensitive prompts ("today", "current price", ...)             short TTL
``policy``          the tenant's blocklist words and regexes (drop) and hold lists     drop / hold
``caller_flags``    the caller's own flags (e.g. a provider's moderation verdict)      drop / hold by list
==================  =================================================================  ======================

Matched text is never logged or stored in a reason: a :class:`~cache_core.schema.FlagReason` carries the field
and the character spans only (the entry keeps the text itself, so a reviewer sees it in context).

A custom check is any object with a ``name`` and ``check(command, policy) -> list[Finding]``; add it with
``SafetyPipeline(checks=[*default_checks(), MyCheck()])`` or by naming a factory in ``SEMCACHE_SAFETY_EXTRA_CHECKS``.

>>> from cache_core.schema import Scope, WriteCommand
>>> pipeline = SafetyPipeline.from_settings(Settings())
>>> cmd = WriteCommand(prompt="Who wrote Hamlet?", response="Reach me at jo@example.com", scope=Scope(tenant="a"))
>>> verdict = pipeline.evaluate(cmd)
>>> verdict.decision.value, verdict.flags, verdict.reasons[0].spans
('hold', ['pii:email'], [(12, 26)])
"""

from __future__ import annotations

import functools
import importlib
import json
import re
from dataclasses import dataclass, field
from typing import Iterable, Literal, Protocol, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cache_core.errors import ConfigError
from cache_core.schema import Decision, FlagReason, WriteCommand
from cache_core.settings import Settings

__all__ = [
    "Finding",
    "Verdict",
    "Check",
    "TenantPolicy",
    "SafetyPolicy",
    "ResolvedPolicy",
    "SafetyPipeline",
    "default_checks",
    "NonAnswerCheck",
    "RefusalCheck",
    "PiiCheck",
    "PromptCheck",
    "PolicyCheck",
    "CallerFlagsCheck",
    "find_pii",
    "luhn_ok",
    "iban_ok",
]

Action = Literal["drop", "hold", "short_ttl", "off"]
Field_ = Literal["prompt", "response", "caller", "scope", ""]
_SEVERITY = {Decision.APPROVE: 0, Decision.HOLD: 1, Decision.DROP: 2}
_MAX_SPANS = 100


@dataclass(frozen=True)
class Finding:
    """One thing a check found. ``action`` is what it asks for; ``spans`` are offsets in ``field``."""

    flag: str
    check: str
    action: Action
    field: Field_ = ""
    spans: tuple[tuple[int, int], ...] = ()
    detail: str = ""

    def reason(self) -> FlagReason:
        return FlagReason(flag=self.flag, check=self.check, detail=self.detail[:500], field=self.field,
                          spans=list(self.spans[:_MAX_SPANS]))


@dataclass
class Verdict:
    """What the pipeline decided for one command."""

    decision: Decision = Decision.APPROVE
    flags: list[str] = field(default_factory=list)
    reasons: list[FlagReason] = field(default_factory=list)
    ttl_cap: int | None = None


class Check(Protocol):
    name: str

    def check(self, command: WriteCommand, policy: "ResolvedPolicy") -> list[Finding]:
        """The findings of this check for one command (empty when it has nothing to say)."""


# --- the policy: settings defaults, then the file's "default", then the tenant's own rules -----------------------
class TenantPolicy(BaseModel):
    """Safety rules of one tenant (or the defaults of every tenant). Unset fields inherit."""

    model_config = ConfigDict(extra="forbid")

    pii: Literal["hold", "drop", "off"] | None = None
    personal: Action | None = None
    time_sensitive: Action | None = None
    refusals: Literal["hold", "drop", "off"] | None = None
    short_ttl_seconds: int | None = Field(None, ge=1)
    ttl_seconds: int | None = Field(None, ge=1, le=10 * 365 * 24 * 3600, description="Default TTL of the tenant.")
    block_words: list[str] = Field(default_factory=list, max_length=10_000)
    block_patterns: list[str] = Field(default_factory=list, max_length=1_000)
    hold_words: list[str] = Field(default_factory=list, max_length=10_000)
    hold_patterns: list[str] = Field(default_factory=list, max_length=1_000)

    @field_validator("block_patterns", "hold_patterns")
    @classmethod
    def _compiles(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"pattern {pattern[:80]!r} is not a valid regular expression: {exc}") from exc
        return value


class SafetyPolicy(BaseModel):
    """The contents of ``SEMCACHE_SAFETY_POLICY_FILE``: ``{"default": {...}, "tenants": {"acme": {...}}}``."""

    model_config = ConfigDict(extra="forbid")

    default: TenantPolicy = Field(default_factory=TenantPolicy)
    tenants: dict[str, TenantPolicy] = Field(default_factory=dict)

    @classmethod
    def load(cls, settings: Settings) -> "SafetyPolicy":
        path = settings.safety_policy_file
        if path is None:
            return cls()
        try:
            return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except OSError as exc:
            raise ConfigError(f"cannot read the safety policy file {path}: {exc}") from exc
        except ValueError as exc:  # json and pydantic errors alike
            if isinstance(exc, ValidationError):
                first = exc.errors(include_url=False)[0]
                detail = f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
            else:
                detail = str(exc)
            raise ConfigError(f"invalid safety policy file {path}: {detail}",
                              hint="see docs/worker.md for the format") from exc


def _words_regex(words: Iterable[str]) -> re.Pattern | None:
    words = [w.strip() for w in words if w.strip()]
    if not words:
        return None
    alternatives = "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


@dataclass(frozen=True)
class ResolvedPolicy:
    """The effective rules of one tenant, with compiled patterns."""

    tenant: str
    pii: str
    personal: str
    time_sensitive: str
    refusals: str
    short_ttl_seconds: int
    ttl_seconds: int | None
    block: tuple[re.Pattern, ...]
    hold: tuple[re.Pattern, ...]
    caller_drop: frozenset[str]
    caller_hold: frozenset[str]


def resolve_policy(settings: Settings, policy: SafetyPolicy, tenant: str) -> ResolvedPolicy:
    layers = [policy.default] + ([policy.tenants[tenant]] if tenant in policy.tenants else [])

    def pick(name: str, default):
        value = default
        for layer in layers:
            if getattr(layer, name) is not None:
                value = getattr(layer, name)
        return value

    block = [_words_regex(w for layer in layers for w in layer.block_words)]
    block += [re.compile(p) for layer in layers for p in layer.block_patterns]
    hold = [_words_regex(w for layer in layers for w in layer.hold_words)]
    hold += [re.compile(p) for layer in layers for p in layer.hold_patterns]
    return ResolvedPolicy(
        tenant=tenant,
        pii=pick("pii", settings.safety_pii),
        personal=pick("personal", settings.safety_personal),
        time_sensitive=pick("time_sensitive", settings.safety_time_sensitive),
        refusals=pick("refusals", settings.safety_refusals),
        short_ttl_seconds=pick("short_ttl_seconds", settings.safety_short_ttl_seconds),
        ttl_seconds=pick("ttl_seconds", None),
        block=tuple(p for p in block if p is not None),
        hold=tuple(p for p in hold if p is not None),
        caller_drop=frozenset(settings.safety_caller_flags_drop),
        caller_hold=frozenset(settings.safety_caller_flags_hold),
    )


# --- non-answers -----------------------------------------------------------------------------------------------
_ERROR_PATTERNS = re.compile(
    r"""^\s*(?:
        (?:error|exception)\s*(?:\d{3})?\s*:                                   # "Error: ...", "Error 429: ..."
      | traceback\ \(most\ recent\ call\ last\)
      | (?:\d{3}\s+)?(?:internal\ server\ error|service\ unavailable|bad\ gateway|gateway\ time-?out
                      |too\ many\ requests)\b
      | an?\ (?:unexpected\ |internal\ )?error\ (?:has\ )?occurred
      | (?:the\ )?(?:server|model|engine|service)\ (?:is|was)\ (?:currently\ )?overloaded
      | request\ timed\ out
      | rate\ limit\ (?:exceeded|reached)
    )""",
    re.IGNORECASE | re.VERBOSE,
)
_TRUNCATED = {"length", "max_tokens", "max_output_tokens", "token_limit"}
_FILTERED = {"content_filter", "safety", "recitation", "blocked"}


def _error_payload(response: str) -> bool:
    text = response.strip()
    if text.startswith("{") and len(text) < 20_000:
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict) and ("error" in data or data.get("type") == "error" or data.get("object") == "error"):
            return True
    return bool(_ERROR_PATTERNS.match(text[:300]))


class NonAnswerCheck:
    """Errors and non-answers are never cached: empty responses, error payloads, truncated or filtered output."""

    name = "nonanswer"

    def check(self, command: WriteCommand, policy: ResolvedPolicy) -> list[Finding]:
        out = []
        if not command.response.strip():
            out.append(Finding("nonanswer:empty", self.name, "drop", "response", detail="empty or whitespace"))
        elif _error_payload(command.response):
            out.append(Finding("nonanswer:error", self.name, "drop", "response", detail="provider error payload"))
        reason = (command.finish_reason or "").strip().lower()
        if reason in _TRUNCATED:
            out.append(Finding("nonanswer:truncated", self.name, "drop", "response",
                               detail=f"finish_reason={reason}: cut off by a token limit"))
        elif reason in _FILTERED:
            out.append(Finding("nonanswer:content_filter", self.name, "drop", "response",
                               detail=f"finish_reason={reason}: withheld by the provider's filter"))
        return out


_REFUSAL = re.compile(
    r"""^\W*(?:
        (?:i'?m|i\ am)\ (?:so\ |very\ |truly\ )?(?:sorry|afraid)[,.!]?\s+(?:but\s+)?
            (?:as\ an\ ai(?:\ language\ model|\ model|\ assistant)?,?\s+)?(?:i\s+|i'?m\s+|i\ am\s+)?
            (?:can'?t|cannot|can\ not|unable|not\ able|won'?t|will\ not|must\ decline)\b
      | (?:sorry|unfortunately|apologies)[,.!]?\s+(?:but\s+)?i\ (?:can'?t|cannot|won'?t|am\ unable|'m\ unable
            |am\ not\ able|must\ decline)\b
      | i\ (?:can'?t|cannot|can\ not|won'?t|will\ not|am\ unable\ to|'m\ unable\ to|am\ not\ able\ to|'m\ not\ able\ to)
            \ (?:help|assist|comply|provide|answer|respond|do\ that|fulfil|support|share|discuss|give)\b
      | i\ (?:must|have\ to)\ (?:respectfully\ )?(?:decline|refuse)\b
      | as\ an\ ai(?:\ language\ model|\ model|\ assistant)?,?
            \ i\ (?:can'?t|cannot|don'?t|do\ not|am\ (?:not\ able|unable))
    )""",
    re.IGNORECASE | re.VERBOSE,
)


class RefusalCheck:
    """Refusals are answers to nobody: caching one would refuse every later paraphrase too."""

    name = "refusal"

    def check(self, command: WriteCommand, policy: ResolvedPolicy) -> list[Finding]:
        if policy.refusals == "off":
            return []
        head = command.response[:400].replace("\u2019", "'")
        if _REFUSAL.match(head):
            return [Finding("nonanswer:refusal", self.name, policy.refusals, "response", detail="the model refused")]
        return []


# --- PII ---------------------------------------------------------------------------------------------------------
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*"
                    r"\.[A-Za-z]{2,24}(?!\w)")
_CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])")
_SSN = re.compile(r"(?<![\w-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-])")
_NINO = re.compile(r"(?<![A-Za-z0-9])(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
                   r" ?\d{2} ?\d{2} ?\d{2} ?[A-D](?![A-Za-z0-9])")
_PHONE = re.compile(
    r"""(?<![\w+.-])(?:
        \+\d{1,3}(?:[ .-]?\(?\d{1,5}\)?){2,6}                  # international: +44 20 7946 0958, +1 (555) 123-4567
      | \(\d{2,5}\)[ -]?\d{2,4}(?:[ -]\d{2,4}){1,3}              # (555) 123-4567, (020) 7946 0958
      | \d{2,5}[ -]\d{2,4}(?:[ -]\d{2,4}){1,3}                   # 555-123-4567, 06 12 34 56 78, 020 7946 0958
      | \d{3}\.\d{3}\.\d{4}                                       # 555.123.4567
      | 0\d{9,10}                                                 # 0612345678
    )(?![\w-])""",
    re.VERBOSE,
)


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of a card number.

    >>> luhn_ok("4111111111111111"), luhn_ok("4111111111111112")
    (True, False)
    """
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(candidate: str) -> bool:
    """ISO 13616 mod-97 check of an IBAN (spaces ignored).

    >>> iban_ok("GB82 WEST 1234 5698 7654 32"), iban_ok("GB82 WEST 1234 5698 7654 33")
    (True, False)
    """
    iban = candidate.replace(" ", "")
    if not 15 <= len(iban) <= 34:
        return False
    rearranged = iban[4:] + iban[:4]
    number = "".join(str(int(ch, 36)) for ch in rearranged)
    return int(number) % 97 == 1


def _overlaps(span: tuple[int, int], taken: list[tuple[int, int]]) -> bool:
    return any(span[0] < end and start < span[1] for start, end in taken)


def find_pii(text: str) -> dict[str, list[tuple[int, int]]]:
    """PII kinds found in ``text`` with their character spans: ``{"email": [(start, end)], ...}``.

    Longer, checksummed kinds are found first (cards, IBANs), so a card number is not also reported as a phone.

    >>> find_pii("card 4111 1111 1111 1111, call +1 (555) 123-4567")
    {'card': [(5, 24)], 'phone': [(31, 48)]}
    """
    found: dict[str, list[tuple[int, int]]] = {}
    taken: list[tuple[int, int]] = []

    def add(kind: str, span: tuple[int, int]) -> None:
        if not _overlaps(span, taken):
            found.setdefault(kind, []).append(span)
            taken.append(span)

    for m in _EMAIL.finditer(text):
        add("email", m.span())
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and luhn_ok(digits) and len(set(digits)) > 1:
            add("card", m.span())
    for m in _IBAN.finditer(text):
        if iban_ok(m.group()):
            add("iban", m.span())
    for pattern in (_SSN, _NINO):
        for m in pattern.finditer(text):
            add("national_id", m.span())
    for m in _PHONE.finditer(text):
        digits = sum(ch.isdigit() for ch in m.group())
        if 9 <= digits <= 15:
            add("phone", m.span())
    return found


class PiiCheck:
    """Personal data in the prompt or the response: held for review (or dropped), with the spans recorded."""

    name = "pii"

    def check(self, command: WriteCommand, policy: ResolvedPolicy) -> list[Finding]:
        if policy.pii == "off":
            return []
        out = []
        for field_name in ("prompt", "response"):
            for kind, spans in find_pii(getattr(command, field_name)).items():
                out.append(Finding(f"pii:{kind}", self.name, policy.pii, field_name, tuple(spans),
                                   detail=f"{len(spans)} match(es) in the {field_name}"))
        return out


# --- prompts that should not be shared, or not for long -----------------------------------------------------------
_PERSONAL = re.compile(
    r"""\b(?:
        (?:my|our)\ (?:(?:current|last|latest|next|recent|new)\ )?
        (?:orders?|account|accounts|password|passcode|pin|balance|bank|card|credit\ card|debit\ card|bills?|payments?
          |invoices?|subscriptions?|package|parcel|delivery|shipment|flight|booking|reservations?|appointments?
          |tickets?|claim|refund|loan|mortgage|insurance|policy|doctor|prescriptions?|test\ results|medical\ records?
          |profile|e-?mail|address|phone(?:\ number)?|salary|paycheck|tax(?:es)?|transactions?|statements?
          |credit\ score|credit\ limit|routing\ number|pto|vacation\ days|calendar|schedule|meetings?|reminders?
          |to-?do\ list|shopping\ list|rewards?|points|car|visa|application|case\ number|tracking\ number)
      | (?:where\ is|where's|track|status\ of|cancel)\ (?:my|our)
    )\b""",
    re.IGNORECASE | re.VERBOSE,
)
# "How do I cancel my subscription?" asks for instructions that are the same for everyone: not personal.
_HOW_TO = re.compile(r"^\W*(?:how\ (?:do|can|could|should|would)\ (?:i|we|you|one)|how\ to"
                     r"|what\ (?:are\ the\ )?steps|is\ it\ possible\ to"
                     r"|what\ do\ i\ (?:need|have)\ to\ do)\b", re.IGNORECASE)
_TIME_SENSITIVE = re.compile(
    r"""\b(?:
        today|today's|tonight|tomorrow|yesterday|right\ now|currently|current|latest|recent|recently|breaking
      | now|at\ the\ moment|as\ of|up[- ]to[- ]date|live|this\ (?:week|weekend|month|year|morning|afternoon|evening)
      | (?:stock|share|crypto|bitcoin|gas|fuel|gold|exchange|interest|mortgage)\ (?:prices?|rates?)
      | weather|forecast|news|headlines|scores?|traffic
      | what\ time\ is\ it|what(?:'s|\ is)\ the\ (?:date|time|day)
    )\b""",
    re.IGNORECASE | re.VERBOSE,
)


class PromptCheck:
    """Personal prompts (answers about one user) and time-sensitive ones (answers that go stale)."""

    name = "prompt"

    def check(self, command: WriteCommand, policy: ResolvedPolicy) -> list[Finding]:
        out = []
        prompt = command.prompt.replace("\u2019", "'")
        for flag, pattern, action in (("prompt:personal", _PERSONAL, policy.personal),
                                      ("prompt:time_sensitive", _TIME_SENSITIVE, policy.time_sensitive)):
            if action == "off" or (flag == "prompt:personal" and _HOW_TO.match(prompt)):
                continue
            spans = tuple(m.span() for m in pattern.finditer(prompt))
            if spans:
                out.append(Finding(flag, self.name, action, "prompt", spans,
                                   detail=f"{flag.split(':')[1].replace('_', '-')} prompt: {action.replace('_', ' ')}"))
        return out


class PolicyCheck:
    """The tenant's own blocklist (drop) and hold list (review), as words or regular expressions."""

    name = "policy"

    def check(self, command: WriteCommand, policy: ResolvedPolicy) -> list[Finding]:
        out = []
        for flag, patterns, action in (("policy:blocked", policy.block, "drop"), ("policy:held", policy.hold, "hold")):
            for field_name in ("prompt", "response"):
                text = getattr(command, field_name)
                spans = tuple(m.span() for p in patterns for m in p.finditer(text) if m.end() > m.start())
                if spans:
                    out.append(Finding(flag, self.name, action, field_name, tuple(sorted(spans)),
                                       detail=f"tenant policy matched {len(spans)} time(s) in the {field_name}"))
        return out


class CallerFlagsCheck:
    """The caller's own verdict (for example its LLM provider's moderation) decides too."""

    name = "caller_flags"

    def check(self, command: WriteCommand, policy: ResolvedPolicy) -> list[Finding]:
        out = []
        for flag in command.flags:
            if flag in policy.caller_drop:
                out.append(Finding(flag, self.name, "drop", "caller", detail="caller flag: not cacheable"))
            elif flag in policy.caller_hold:
                out.append(Finding(flag, self.name, "hold", "caller", detail="caller flag: needs review"))
        return out


def default_checks() -> list[Check]:
    return [NonAnswerCheck(), RefusalCheck(), PiiCheck(), PromptCheck(), PolicyCheck(), CallerFlagsCheck()]


def _extra_checks(settings: Settings) -> list[Check]:
    out = []
    for spec in settings.safety_extra_checks:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ConfigError(f"cannot load safety check {spec!r}: {exc}", hint="use module.path:factory") from exc
        out.append(factory(settings))
    return out


class SafetyPipeline:
    """Runs the checks and merges their findings into a :class:`Verdict`."""

    def __init__(self, settings: Settings, checks: Sequence[Check] | None = None, policy: SafetyPolicy | None = None):
        self.settings = settings
        self.checks = list(checks) if checks is not None else default_checks()
        self.policy = policy if policy is not None else SafetyPolicy.load(settings)
        self._resolve = functools.lru_cache(maxsize=1024)(lambda tenant: resolve_policy(settings, self.policy, tenant))

    @classmethod
    def from_settings(cls, settings: Settings) -> "SafetyPipeline":
        """The default checks, then any named by ``SEMCACHE_SAFETY_EXTRA_CHECKS``; the policy file loaded once."""
        return cls(settings, [*default_checks(), *_extra_checks(settings)])

    def policy_for(self, tenant: str) -> ResolvedPolicy:
        return self._resolve(tenant)

    def evaluate(self, command: WriteCommand) -> Verdict:
        policy = self.policy_for(command.scope.tenant)
        verdict = Verdict()
        flags = set()
        for check in self.checks:
            for finding in check.check(command, policy):
                if finding.action == "off":
                    continue
                decision = {"drop": Decision.DROP, "hold": Decision.HOLD}.get(finding.action, Decision.APPROVE)
                if _SEVERITY[decision] > _SEVERITY[verdict.decision]:
                    verdict.decision = decision
                if finding.action == "short_ttl":
                    cap = policy.short_ttl_seconds
                    verdict.ttl_cap = cap if verdict.ttl_cap is None else min(verdict.ttl_cap, cap)
                flags.add(finding.flag)
                verdict.reasons.append(finding.reason())
        verdict.flags = sorted(flags)
        return verdict
