"""Discovery: GET /cds-services and the prefetch templates it publishes (checklist 2.2, 2.4: DISC-01..08, PF-01..03).

The template checks here are written independently of discovery.check_template, so a template
that slips past the service's own linter still fails a test.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

import pytest
from fastapi.testclient import TestClient

from cds_service.app import create_app
from cds_service.discovery import check_template, fill_template
from server_support import app_settings

TOKENS_2_0 = {
    "context.patientId", "context.userId", "context.encounterId",
    "userPractitionerId", "userPractitionerRoleId", "userPatientId", "userRelatedPersonId",
}
NEEDED_TYPES = {"Patient", "Condition", "Observation", "MedicationRequest", "MedicationStatement", "Procedure", "ServiceRequest"}
TOKEN = re.compile(r"\{\{(.*?)\}\}")


@pytest.fixture(scope="module")
def discovery(tmp_path_factory):
    app = create_app(app_settings(tmp_path_factory.mktemp("discovery")))
    with TestClient(app) as client:
        response = client.get("/cds-services")
    return response


@pytest.fixture(scope="module")
def services(discovery) -> list[dict]:
    return discovery.json()["services"]


def test_discovery_is_200_json_with_a_services_array(discovery):
    assert discovery.status_code == 200
    assert discovery.headers["content-type"].startswith("application/json")
    body = discovery.json()
    assert list(body) == ["services"]
    assert isinstance(body["services"], list) and body["services"]


def test_discovery_answers_with_a_trailing_slash_too(tmp_path, discovery):
    """A base URL configured as ".../cds-services/" finds the same services (and no redirect to follow)."""
    with TestClient(create_app(app_settings(tmp_path))) as client:
        response = client.get("/cds-services/", follow_redirects=False)
    assert response.status_code == 200 and response.json() == discovery.json()


def test_one_service_per_hook_with_distinct_ids(services):
    assert sorted(s["hook"] for s in services) == ["order-select", "order-sign"]
    ids = [s["id"] for s in services]
    assert len(set(ids)) == len(ids) == 2  # the sandbox collapses services that share an id (DISC-06)


@pytest.mark.parametrize("hook", ["order-select", "order-sign"])
def test_each_service_entry_is_complete(services, hook):
    entry = next(s for s in services if s["hook"] == hook)
    for name in ("hook", "id", "title", "description"):
        assert isinstance(entry[name], str) and entry[name].strip(), name
    assert re.fullmatch(r"[A-Za-z0-9._~-]+", entry["id"])  # usable as the {id} path segment
    assert isinstance(entry["prefetch"], dict) and entry["prefetch"]
    assert all(isinstance(k, str) and isinstance(v, str) and v for k, v in entry["prefetch"].items())
    assert set(entry) <= {"hook", "id", "title", "description", "prefetch", "usageRequirements"}


def test_service_urls_answer_post_for_every_discovered_id(tmp_path, services):
    with TestClient(create_app(app_settings(tmp_path))) as client:
        for entry in services:
            response = client.post(f"/cds-services/{entry['id']}", content=b"{}")
            assert response.status_code == 400  # routed to the service (validation), not 404


def _template_problems(template: str) -> list[str]:
    """Independent check of one template against the CDS Hooks 2.0 tokens and query subset."""
    problems = [f"token {t}" for t in TOKEN.findall(template) if t not in TOKENS_2_0]
    bare = TOKEN.sub("X", template)
    path, _, query = bare.partition("?")
    resource_type = path.split("/")[0]
    if not re.fullmatch(r"[A-Z][A-Za-z]+", resource_type) or "://" in path or bare.startswith("/"):
        problems.append("not a relative FHIR URL")
    if not query and path.count("/") != 1:
        problems.append("not an instance read")
    if query and "/" in path:
        problems.append("not a type-level search")
    for name, value in parse_qsl(query, keep_blank_values=True):
        base, _, modifier = name.partition(":")
        if base in ("_include", "_revinclude", "_has", "_elements", "_summary", "_filter", "_query", "_contained"):
            problems.append(f"{base} outside the 2.0 subset")
        elif base.startswith("_") and base not in ("_count", "_sort", "_id", "_lastUpdated"):
            problems.append(f"{base} outside the 2.0 subset")
        if "." in name:
            problems.append(f"chained parameter {name}")
        if modifier and modifier != "in":
            problems.append(f"modifier :{modifier}")
        if any(re.match(r"(ne|sa|eb|ap)\d", v) for v in value.split(",")):
            problems.append(f"date prefix in {name}={value}")
        if not value:
            problems.append(f"{name} has no value")
    return problems


def test_templates_use_only_2_0_tokens_and_the_query_subset(services):
    for entry in services:
        for key, template in entry["prefetch"].items():
            assert _template_problems(template) == [], (entry["id"], key, template)


def test_templates_cover_every_resource_type_the_decision_reads(services):
    for entry in services:
        types = {template.split("?")[0].split("/")[0] for template in entry["prefetch"].values()}
        assert NEEDED_TYPES <= types, NEEDED_TYPES - types
        for key, template in entry["prefetch"].items():
            assert "{{context.patientId}}" in template, key  # every query is about this patient


def test_templates_fill_from_a_sandbox_context(services):
    context = {"patientId": "lbp1", "userId": "Practitioner/COREPRACTITIONER1"}
    for entry in services:
        for template in entry["prefetch"].values():
            filled = fill_template(template, context)
            assert filled is not None and "{{" not in filled and "lbp1" in filled


def test_fill_template_tokens():
    context = {"patientId": "a b/c", "userId": "PractitionerRole/r1", "encounterId": "e1"}
    assert fill_template("Patient/{{context.patientId}}", context) == "Patient/a%20b%2Fc"
    assert fill_template("PractitionerRole/{{userPractitionerRoleId}}", context) == "PractitionerRole/r1"
    assert fill_template("Encounter/{{context.encounterId}}", context) == "Encounter/e1"
    assert fill_template("Practitioner/{{userPractitionerId}}", context) is None  # the user is a role
    assert fill_template("Encounter/{{context.encounterId}}", {"patientId": "p"}) is None


@pytest.mark.parametrize("hook", ["order-select", "order-sign"])
@pytest.mark.parametrize("template", [
    "Patient/{{context.patientId}}",
    "Condition?patient={{context.patientId}}&_count=200",
    "Condition?patient={{context.patientId}}&clinical-status=active",
    "Observation?patient={{context.patientId}}&code=http://loinc.org|8310-5,http://loinc.org|8331-1",
    "Observation?patient={{context.patientId}}&code:in=http://example.org/ValueSet/fever",
    "Observation?patient={{context.patientId}}&date=ge2024-01-01&_sort=-date",
    "Encounter/{{context.encounterId}}",
    "Practitioner/{{userPractitionerId}}",
    "PractitionerRole/{{userPractitionerRoleId}}",
    "Patient/{{userPatientId}}",
    "RelatedPerson/{{userRelatedPersonId}}",
    "ServiceRequest?patient={{context.patientId}}&_id=abc",
])
def test_check_template_accepts_the_2_0_subset(hook, template):
    check_template(hook, "k", template)
    assert _template_problems(template) == []


@pytest.mark.parametrize("template, why", [
    ("ServiceRequest/{{context.draftOrders}}", "draftOrders is not a token"),
    ("ServiceRequest?_id={{context.selections}}", "selections is not a token"),
    ("Patient/{{context.foo}}", "unknown context field"),
    ("Patient/{{userFooId}}", "unknown user token"),
    ("Patient/{{patientId}}", "unqualified token"),
    ("Patient/{{context.patientId}", "unbalanced braces"),
    ("PractitionerRole?practitioner={{userPractitionerId}}&_include=PractitionerRole:practitioner", "_include"),
    ("Patient?_id={{context.patientId}}&_revinclude=Condition:patient", "_revinclude"),
    ("Patient?_has:Condition:patient:code=1234", "_has"),
    ("Condition?subject.name=smith", "chained parameter"),
    ("Condition?subject:Patient.name=smith", "chained parameter with a type"),
    ("Condition?patient={{context.patientId}}&code:text=back", ":text"),
    ("Condition?patient={{context.patientId}}&code:not=1234", ":not"),
    ("Condition?patient={{context.patientId}}&code:missing=true", ":missing"),
    ("Observation?patient={{context.patientId}}&date=ne2024-01-01", "ne prefix"),
    ("Observation?patient={{context.patientId}}&date=sa2024-01-01", "sa prefix"),
    ("Observation?patient={{context.patientId}}&date=ap2024-01-01", "ap prefix"),
    ("Observation?patient={{context.patientId}}&_elements=code", "_elements"),
    ("Observation?patient={{context.patientId}}&_summary=count", "_summary"),
    ("https://ehr.example.org/fhir/Patient/{{context.patientId}}", "absolute URL"),
    ("/Patient/{{context.patientId}}", "leading slash"),
    ("Patient/{{context.patientId}}/_history", "not a read"),
    ("Patient/{{context.patientId}}/$everything", "operation"),
    ("Patient/{{context.patientId}}/Condition?code=1", "compartment search"),
    ("patient/{{context.patientId}}", "not a resource type"),
    ("Condition?patient", "parameter without a value"),
])
def test_check_template_rejects_templates_outside_2_0(template, why):
    with pytest.raises(ValueError):
        check_template("order-select", "k", template)
    assert _template_problems(template) or why in ("unbalanced braces", "not a read", "operation")


def test_selections_token_is_not_even_a_token_of_order_sign():
    with pytest.raises(ValueError, match="selections"):
        check_template("order-sign", "k", "ServiceRequest?_id={{context.selections}}")


def test_discovery_body_has_no_null_or_empty_value(discovery):
    def empties(value, path="$"):
        if value is None or value == "" or value == [] or value == {}:
            return [path]
        if isinstance(value, dict):
            return [p for k, v in value.items() for p in empties(v, f"{path}.{k}")]
        if isinstance(value, list):
            return [p for i, v in enumerate(value) for p in empties(v, f"{path}[{i}]")]
        return []

    assert empties(discovery.json()) == []


SERVICE_YAML = """
services:
  - id: {id}
    hook: {hook}
    title: t
    description: d
    prefetch:
      patient: "Patient/{{{{context.patientId}}}}"
      other: "{template}"
  - id: second
    hook: order-sign
    title: t
    description: d
"""


@pytest.mark.parametrize("service_id, hook, template, problem", [
    ("ok", "order-select", "Condition?patient={{context.patientId}}&_include=Condition:subject", "_include"),
    ("ok", "order-select", "ServiceRequest/{{context.draftOrders}}", "draftOrders"),
    ("ok", "patient-view", "Condition?patient={{context.patientId}}", "unknown hook"),
    ("second", "order-select", "Condition?patient={{context.patientId}}", "duplicated"),
    ("not url safe", "order-select", "Condition?patient={{context.patientId}}", "URL-safe"),
])
def test_bad_service_definitions_fail_at_start_up(tmp_path, service_id, hook, template, problem):
    from cds_service.discovery import load_services
    from fhir_mappings.knowledge import Knowledge

    path = tmp_path / "services.yaml"
    path.write_text(SERVICE_YAML.format(id=service_id, hook=hook, template=template), encoding="utf-8")
    with pytest.raises(ValueError, match=problem.split()[0]):
        load_services(Knowledge.load().codes, path)


def test_good_service_definitions_load(tmp_path):
    from cds_service.discovery import load_services
    from fhir_mappings.knowledge import Knowledge

    path = tmp_path / "services.yaml"
    path.write_text(SERVICE_YAML.format(id="first", hook="order-select", template="Condition?patient={{context.patientId}}"), encoding="utf-8")
    services = load_services(Knowledge.load().codes, path)
    assert list(services) == ["first", "second"]
    assert services["first"].prefetch["other"] == "Condition?patient={{context.patientId}}"


def test_a_service_without_prefetch_publishes_no_empty_prefetch_object(tmp_path):
    """GEN-02: `prefetch` is OPTIONAL; a service with no templates omits it instead of sending {}."""
    from cds_service.discovery import load_services
    from fhir_mappings.knowledge import Knowledge

    path = tmp_path / "services.yaml"
    path.write_text(SERVICE_YAML.format(id="first", hook="order-select", template="Condition?patient={{context.patientId}}"), encoding="utf-8")
    entry = load_services(Knowledge.load().codes, path)["second"].discovery_entry()
    assert entry == {"hook": "order-sign", "id": "second", "title": "t", "description": "d"}


@pytest.mark.parametrize("field, value", [("description", "' '"), ("title", "''")])
def test_blank_discovery_texts_fail_at_start_up(tmp_path, field, value):
    """DISC-04, GEN-02: description is REQUIRED and title RECOMMENDED; neither may be an empty string."""
    from cds_service.discovery import load_services
    from fhir_mappings.knowledge import Knowledge

    text = SERVICE_YAML.format(id="first", hook="order-select", template="Condition?patient={{context.patientId}}")
    head, _, tail = text.partition("  - id: second")
    tail = tail.replace(f"    {field}: {field[0]}\n", f"    {field}: {value}\n")
    path = tmp_path / "services.yaml"
    path.write_text(head + "  - id: second" + tail, encoding="utf-8")
    with pytest.raises(ValueError, match=field):
        load_services(Knowledge.load().codes, path)
