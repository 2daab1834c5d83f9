"""Clinical facts -> one assessment per lumbar imaging order: which guideline branch applies, and why. Pure.

Evaluation order (criteria.md section 3; first match wins):
  1. cauda equina feature, any age, whatever else is missing     -> cauda-equina-emergency (critical)
  2. patient demographics unreadable                             -> imaging-data-incomplete
  3. age under the adult threshold                               -> no card (data-incomplete if a CES source is unread)
  4. conditions unreadable and no red flag found elsewhere       -> imaging-data-incomplete
  5. no current back pain episode (conditions read)              -> no card (data-incomplete if a CES source is unread)
  6. any red flag                                                -> imaging-indicated
  7. >= 6 weeks of conservative care since the episode began     -> imaging-indicated
  8. episode start unknown                                       -> no card (avoid false alerts; as 3 and 5)
  9. any data needed to rule out red flags not read              -> imaging-data-incomplete
 10. otherwise                                                   -> imaging-not-indicated (warning)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fhir_mappings.facts import ClinicalFacts, Finding, ImagingOrder
from fhir_mappings.knowledge import Knowledge

CES = "cauda-equina-emergency"
INDICATED = "imaging-indicated"
NOT_INDICATED = "imaging-not-indicated"
INCOMPLETE = "imaging-data-incomplete"

# The data the "not indicated" advice rests on: every red flag source must have been read.
NEEDED_TO_RULE_OUT = ("Patient", "Condition", "Observation", "MedicationRequest", "MedicationStatement", "Procedure", "ServiceRequest")


@dataclass(frozen=True)
class Protocol:
    modality: str  # MR | CT | XR
    contrast: str | None  # without | with-and-without | None (X-ray, CT as ordered)
    order_is_fine: bool  # the order as placed matches the recommendation
    # Pregnancy (M1): the flags call for gadolinium but it is not recommended unless essential (criteria.md 1.1).
    gadolinium_withheld: bool = False


@dataclass
class Assessment:
    order: ImagingOrder
    card_type: str | None  # None: no card
    rule: str  # C1.., R1.., F1, W1, N-child, N-no-episode, N-unknown-duration, INCOMPLETE
    reason: str  # one line, for the audit and `evaluate`
    findings: list[Finding] = field(default_factory=list)
    protocol: Protocol | None = None
    unread: dict[str, str] = field(default_factory=dict)  # resource type -> why, when it matters here
    # Other facts found that did not decide the branch (red flags behind a cauda equina card, failed
    # conservative care behind a red flag): reported in the card's machine-readable facts, not its advice.
    also: list[Finding] = field(default_factory=list)


def assess(facts: ClinicalFacts, knowledge: Knowledge) -> list[Assessment]:
    return [assess_order(order, facts, knowledge) for order in facts.orders]


def assess_order(order: ImagingOrder, facts: ClinicalFacts, knowledge: Knowledge) -> Assessment:
    unread = {**{t: "not sent and not fetchable" for t in facts.missing}, **facts.unreadable}
    failed_care = [facts.conservative_care] if facts.conservative_care_failed and facts.conservative_care is not None else []
    if facts.ces:
        return Assessment(order, CES, facts.ces[0].rule, "cauda equina feature present", list(facts.ces),
                          ces_protocol(order, facts), _subset(unread, NEEDED_TO_RULE_OUT),
                          also=list(facts.red_flags) + failed_care)
    if "Patient" in unread:
        return Assessment(order, INCOMPLETE, "INCOMPLETE", "patient record could not be read", unread=unread)
    # "No card" is only said when cauda equina could be ruled out: with a CES source unread (a saddle
    # numbness Observation, a retention Condition), the data-incomplete card (or 412) instead.
    ces_unread = _subset(unread, ces_sources(knowledge))
    adult_age = knowledge.criteria["policy"]["adult_age_years"]
    if facts.age is not None and facts.age < adult_age:
        if ces_unread:
            return Assessment(order, INCOMPLETE, "INCOMPLETE", "cauda equina features could not be ruled out", unread=ces_unread)
        return Assessment(order, None, "N-child", f"age {facts.age} is under {adult_age}")
    if "Condition" in unread and not facts.red_flags:
        return Assessment(order, INCOMPLETE, "INCOMPLETE", "conditions could not be read", unread=unread)
    if facts.episode is None and "Condition" not in unread:
        if ces_unread:
            return Assessment(order, INCOMPLETE, "INCOMPLETE", "cauda equina features could not be ruled out", unread=ces_unread)
        return Assessment(order, None, "N-no-episode", "no current low back pain or sciatica episode recorded")
    if facts.red_flags:
        return Assessment(order, INDICATED, facts.red_flags[0].rule, "red flag present", list(facts.red_flags),
                          indicated_protocol(order, facts.red_flags, _pregnant(facts)), unread, also=failed_care)
    if facts.conservative_care_failed and facts.conservative_care is not None:
        care = facts.conservative_care
        return Assessment(order, INDICATED, care.rule, f"conservative care for {facts.conservative_care_days} days",
                          [care], indicated_protocol(order, [care], _pregnant(facts)), unread)
    if facts.episode is None or facts.episode.start is None:
        if ces_unread:
            return Assessment(order, INCOMPLETE, "INCOMPLETE", "cauda equina features could not be ruled out", unread=ces_unread)
        return Assessment(order, None, "N-unknown-duration", "episode start not recorded")
    if unread:
        return Assessment(order, INCOMPLETE, "INCOMPLETE", "data needed to rule out red flags could not be read", unread=unread)
    if facts.age is None:  # "not indicated" is advice for adults: unknown age, no such advice
        return Assessment(order, INCOMPLETE, "INCOMPLETE", "age unknown", unread={"Patient": "no birth date, age unknown"})
    return Assessment(order, NOT_INDICATED, "W1", f"episode {facts.episode_days} days, no red flags, conservative care under 6 weeks")


def indicated_protocol(order: ImagingOrder, findings: list[Finding], pregnant: bool = False) -> Protocol:
    """Contrast (criteria.md 1.1): without by default; without and with for suspected infection, malignancy or
    prior lumbar surgery; in pregnancy no gadolinium unless essential, so without, and no ionising radiation."""
    wanted = "with-and-without" if any(f.protocol == "with-and-without" for f in findings) else "without"
    contrast = "without" if pregnant else wanted
    withheld = contrast != wanted
    fine_everywhere = all(order.modality in f.fine_orders for f in findings)
    if order.modality == "MR":
        return Protocol("MR", contrast, order.contrast == contrast, withheld)
    # a CT fits only without contrast (or contrast not stated): these flags' protocol is "without" (ACR V6);
    # in pregnancy no radiography or CT: MRI without gadolinium (criteria.md 1.9 "avoid ionising radiation")
    if fine_everywhere and not pregnant and order.contrast in (None, "unspecified", contrast):
        return Protocol(order.modality, None, True)
    return Protocol("MR", contrast, False, withheld)


def ces_protocol(order: ImagingOrder, facts: ClinicalFacts) -> Protocol:
    """Emergency MRI; without contrast unless infection or tumour is suspected (never delay for contrast);
    without in pregnancy."""
    wanted = "with-and-without" if any(f.protocol == "with-and-without" for f in facts.red_flags) else "without"
    contrast = "without" if _pregnant(facts) else wanted
    if order.modality == "MR":
        return Protocol("MR", contrast, True, contrast != wanted)  # any MRI protocol is acceptable for suspected CES (ACR V4)
    return Protocol("MR", contrast, False, contrast != wanted)


def _pregnant(facts: ClinicalFacts) -> bool:
    return facts.has_modifier("MOD-PREGNANCY")


def ces_sources(knowledge: Knowledge) -> tuple[str, ...]:
    """The resource types the cauda equina features are read from (criteria.yaml ces_features)."""
    types = {source for feature in knowledge.criteria["ces_features"] for source in feature["sources"]}
    return tuple(sorted(types - {"OrderReason"}))


def _subset(unread: dict[str, str], types: tuple[str, ...]) -> dict[str, str]:
    return {t: unread[t] for t in types if t in unread}
