/* Demo EHR: fires CDS Hooks order-select / order-sign at this service and shows the cards.
 *
 * Flow: GET ../cds-services (discovery) and patients -> pick a patient (GET patients/{id}, a FHIR
 * Bundle) -> choose an order: a draft ServiceRequest joins the draft order list and order-select
 * fires with the prefetch filled from the discovery templates -> cards, critical first ->
 * a suggestion applies its actions to the draft list and posts "accepted" feedback; an override
 * posts "overridden" feedback with the chosen reason -> "Sign orders" fires order-sign.
 *
 * Everything is built with DOM calls (textContent, never innerHTML); card details go through
 * CdsMarkdown (markdown.js), which shows raw HTML as text.
 */
(function () {
  "use strict";

  var USER_ID = "Practitioner/demo-clinician";
  var ORDER_CHOICES = [
    { key: "mri-without", system: "http://www.ama-assn.org/go/cpt", code: "72148", display: "MRI lumbar spine, without contrast", label: "MRI lumbar spine without contrast" },
    { key: "mri-without-and-with", system: "http://www.ama-assn.org/go/cpt", code: "72158", display: "MRI lumbar spine, without then with contrast", label: "MRI lumbar spine without and with contrast" },
    { key: "ct", system: "http://www.ama-assn.org/go/cpt", code: "72131", display: "CT lumbar spine, without contrast", label: "CT lumbar spine without contrast" },
    { key: "xray", system: "http://www.ama-assn.org/go/cpt", code: "72100", display: "Radiologic exam lumbosacral spine, 2 or 3 views", label: "X-ray lumbar spine, 2 or 3 views" },
  ];
  var SYSTEM_NAMES = {
    "http://www.ama-assn.org/go/cpt": "CPT", "http://loinc.org": "LOINC", "http://snomed.info/sct": "SNOMED CT",
    "http://radlex.org": "RadLex", "http://hl7.org/fhir/sid/icd-10-cm": "ICD-10-CM", "http://www.nlm.nih.gov/research/umls/rxnorm": "RxNorm",
  };
  var INDICATOR_ORDER = { critical: 0, warning: 1, info: 2 };
  var INDICATOR_TEXT = { critical: "Critical", warning: "Warning", info: "Info" };
  var ACTIVE_CONDITION = ["active", "recurrence", "relapse"];
  var ACTIVE_MEDICATION = ["active", "on-hold", "intended"];

  var state = {
    services: [],
    selectService: null,
    signService: null,
    patients: [],
    patient: null,      // the list entry
    resources: [],      // the chart (Patient first)
    today: null,        // YYYY-MM-DD, the service's today (Bundle.timestamp)
    drafts: [],         // draft ServiceRequests (the order basket)
    signed: [],
    pickedId: null,     // id of the draft created by the order picker
    addressed: {},      // topic|summary -> what the clinician did, this patient
    seq: 0,             // newest hook call; older answers are dropped
    counter: 0,
    pendingSign: false,
  };

  var $ = function (id) { return document.getElementById(id); };

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (name) {
      var value = attrs[name];
      if (value === null || value === undefined || value === false) return;
      if (name === "text") node.textContent = value;
      else if (name === "className") node.className = value;
      else if (name === "hidden") node.hidden = true;
      else if (name === "disabled") node.disabled = true;
      else if (name === "checked") node.checked = true;
      else node.setAttribute(name, value === true ? "" : String(value));
    });
    (children || []).forEach(function (child) {
      if (child === null || child === undefined) return;
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    });
    return node;
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

  function uuid4() {
    if (window.crypto && typeof window.crypto.randomUUID === "function") return window.crypto.randomUUID();
    // Plain-HTTP pages on a non-loopback host are not a secure context: no randomUUID there.
    var b = new Uint8Array(16);
    window.crypto.getRandomValues(b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    var h = Array.prototype.map.call(b, function (x) { return (x + 0x100).toString(16).slice(1); }).join("");
    return h.slice(0, 8) + "-" + h.slice(8, 12) + "-" + h.slice(12, 16) + "-" + h.slice(16, 20) + "-" + h.slice(20);
  }

  function pretty(value) { return JSON.stringify(value, null, 2); }

  async function fetchJson(url, options) {
    var response = await fetch(url, options);
    var body = null;
    var text = await response.text();
    try { body = text ? JSON.parse(text) : null; } catch (e) { body = text; }
    return { status: response.status, ok: response.ok, body: body };
  }

  function outcomeMessage(body) {
    if (body && body.resourceType === "OperationOutcome" && body.issue && body.issue.length) {
      return body.issue.map(function (i) { return i.diagnostics || (i.details && i.details.text) || i.code; }).join(" ");
    }
    return typeof body === "string" ? body.slice(0, 300) : "";
  }

  // ---------------------------------------------------------------- dates and codes
  function daysBetween(from, to) {
    var a = Date.UTC(+from.slice(0, 4), +from.slice(5, 7) - 1, +from.slice(8, 10));
    var b = Date.UTC(+to.slice(0, 4), +to.slice(5, 7) - 1, +to.slice(8, 10));
    return Math.round((b - a) / 86400000);
  }

  function ago(day) {
    if (!day || !state.today) return "";
    var n = daysBetween(day.slice(0, 10), state.today);
    if (n < 0) return "in " + (-n) + " days";
    if (n === 0) return "today";
    if (n === 1) return "yesterday";
    if (n < 14) return n + " days ago";
    if (n < 84) return Math.round(n / 7) + " weeks ago";
    if (n < 730) return Math.round(n / 30.44) + " months ago";
    return Math.floor(n / 365.25) + " years ago";
  }

  function concept(cc) {
    if (!cc) return "";
    if (cc.text) return cc.text;
    var coding = (cc.coding || [])[0] || {};
    return coding.display || coding.code || "";
  }

  function codeLabel(coding) {
    return (SYSTEM_NAMES[coding.system] || coding.system || "") + " " + coding.code;
  }

  function statusOf(cc) { return ((cc && cc.coding) || [{}])[0].code || ""; }

  function resourceDate(r) {
    var period = r.effectivePeriod || r.performedPeriod || r.period || {};
    return r.onsetDateTime || r.effectiveDateTime || r.performedDateTime || r.authoredOn || r.occurrenceDateTime ||
      r.recordedDate || r.issued || period.start || r.dateAsserted || r.date || "";
  }

  function describe(r) {
    switch (r.resourceType) {
      case "Condition": return concept(r.code);
      case "Observation": return concept(r.code) + observationValue(r);
      case "MedicationRequest": case "MedicationStatement":
        return concept(r.medicationCodeableConcept) + (r.dosageInstruction && r.dosageInstruction[0] && r.dosageInstruction[0].text ? ", " + r.dosageInstruction[0].text : "");
      case "Procedure": case "ServiceRequest": return concept(r.code);
      case "Encounter": return (r.class && (r.class.display || r.class.code) || "encounter") + ": " + ((r.reasonCode || []).map(concept).join(", "));
      case "Immunization": return concept(r.vaccineCode);
      default: return r.resourceType + (r.id ? "/" + r.id : "");
    }
  }

  function observationValue(r) {
    var q = r.valueQuantity;
    if (q && q.value !== undefined) return ": " + q.value + " " + unitText(q.unit || q.code || "");
    if (r.component) {
      var parts = r.component.map(function (c) { return c.valueQuantity ? c.valueQuantity.value : null; }).filter(function (v) { return v !== null; });
      if (parts.length) return ": " + parts.join("/") + " " + unitText((r.component[0].valueQuantity || {}).unit || "");
    }
    if (r.valueCodeableConcept) return ": " + concept(r.valueCodeableConcept);
    if (r.valueString) return ": " + r.valueString;
    if (r.valueBoolean !== undefined) return ": " + (r.valueBoolean ? "yes" : "no");
    return "";
  }

  var UNITS = { "Cel": "°C", "[degF]": "°F", "mm[Hg]": "mmHg", "{score}": "" };

  function unitText(unit) { return Object.prototype.hasOwnProperty.call(UNITS, unit) ? UNITS[unit] : unit; }

  // ---------------------------------------------------------------- prefetch (an EHR's job)
  var TOKEN = /\{\{\s*([\w.]+)\s*\}\}/g;

  function fillTemplate(template, context) {
    var unresolved = false;
    var practitioner = /^Practitioner\/(.+)$/.exec(context.userId || "");
    var query = template.replace(TOKEN, function (_, name) {
      var value = null;
      if (name.indexOf("context.") === 0) value = context[name.slice(8)];
      else if (name === "userPractitionerId" && practitioner) value = practitioner[1];
      if (typeof value !== "string") { unresolved = true; return ""; }
      return encodeURIComponent(value);
    });
    return unresolved ? null : query;
  }

  function refersToPatient(resource, patientId) {
    var wanted = "Patient/" + patientId;
    return [resource.subject, resource.patient, resource.beneficiary].some(function (ref) { return ref && ref.reference === wanted; });
  }

  function searchset(resources) {
    return {
      resourceType: "Bundle", type: "searchset", total: resources.length,
      entry: resources.map(function (r) { return { fullUrl: "urn:uuid:" + (r.__fullUrl || uuid4()), resource: strip(r), search: { mode: "match" } }; }),
    };
  }

  // Runs a prefetch query against the chart in memory: reads by id; searches by type and patient.
  // Other search parameters (the Observation template's code list, _count) are not evaluated: the
  // service reads only the codes it needs, so sending all of the patient's Observations is safe.
  function runQuery(query, context) {
    var parts = query.split("?");
    var path = parts[0].replace(/^\/+/, "").split("/");
    if (path.length === 2 && !parts[1]) {
      var found = state.resources.find(function (r) { return r.resourceType === path[0] && r.id === decodeURIComponent(path[1]); });
      return found ? strip(found) : null;
    }
    var params = new URLSearchParams(parts[1] || "");
    var patientParam = params.get("patient") || params.get("subject") || "";
    var patientId = patientParam.replace(/^Patient\//, "") || context.patientId;
    var matches = state.resources.filter(function (r) { return r.resourceType === path[0] && (path[0] === "Patient" ? r.id === patientId : refersToPatient(r, patientId)); });
    return matches.length ? searchset(matches) : null;
  }

  function strip(resource) { return JSON.parse(JSON.stringify(resource)); }

  function buildPrefetch(service, context) {
    var prefetch = {};
    var failing = $("simulate-failure").value;
    Object.keys(service.prefetch || {}).forEach(function (key) {
      var query = fillTemplate(service.prefetch[key], context);
      if (query === null) return;  // a token the EHR cannot fill: the key is left out
      if (key === failing) {
        prefetch[key] = {
          resourceType: "OperationOutcome",
          issue: [{ severity: "error", code: "exception", diagnostics: "Simulated EHR read failure (demo page)" }],
        };
        return;
      }
      prefetch[key] = runQuery(query, context);  // null: the patient has none
    });
    return prefetch;
  }

  // ---------------------------------------------------------------- start-up
  async function start() {
    $("patient-select").addEventListener("change", function (e) { choosePatient(e.target.value); });
    $("sign-button").addEventListener("click", sign);
    $("confirm-sign-button").addEventListener("click", confirmSign);
    try {
      var results = await Promise.all([fetchJson("../cds-services", { headers: { Accept: "application/json" } }), fetchJson("patients")]);
      var discovery = results[0], patients = results[1];
      if (!discovery.ok) throw new Error("discovery answered HTTP " + discovery.status + " " + outcomeMessage(discovery.body));
      if (!patients.ok) throw new Error("the patient list answered HTTP " + patients.status);
      state.services = discovery.body.services || [];
      state.selectService = state.services.find(function (s) { return s.hook === "order-select"; }) || null;
      state.signService = state.services.find(function (s) { return s.hook === "order-sign"; }) || null;
      state.patients = patients.body;
      fillPatientSelect();
      fillFailureSelect();
      setStatus(state.selectService ? "Choose a patient and an order." : "The service publishes no order-select service.", !state.selectService);
    } catch (err) {
      setStatus("The demo could not start: " + err.message, true);
    }
  }

  function fillPatientSelect() {
    var select = $("patient-select");
    clear(select);
    select.appendChild(el("option", { value: "", text: "Choose a patient…" }));
    [["record", "Full records (years of history)"], ["vignette", "Guideline vignettes"]].forEach(function (group) {
      var optgroup = el("optgroup", { label: group[1] });
      state.patients.filter(function (p) { return p.kind === group[0]; }).forEach(function (p) {
        optgroup.appendChild(el("option", { value: p.id, text: p.label }));
      });
      if (optgroup.children.length) select.appendChild(optgroup);
    });
    select.disabled = false;
  }

  function fillFailureSelect() {
    var select = $("simulate-failure");
    var service = state.selectService;
    if (!service) return;
    Object.keys(service.prefetch || {}).forEach(function (key) {
      select.appendChild(el("option", { value: key, text: key }));
    });
  }

  // ---------------------------------------------------------------- patient
  async function choosePatient(id) {
    state.seq++;
    state.patient = null;
    state.resources = [];
    state.drafts = [];
    state.signed = [];
    state.pickedId = null;
    state.addressed = {};
    state.pendingSign = false;
    clear($("cards"));
    $("sign-status").textContent = "";
    $("sign-status").className = "";
    renderOrders();
    renderOrderChoices();
    var summary = $("patient-summary");
    if (!id) {
      summary.hidden = true;
      setStatus("Choose a patient and an order.");
      return;
    }
    var entry = state.patients.find(function (p) { return p.id === id; });
    var seq = state.seq;
    setStatus("Loading the patient's record…");
    var result = await fetchJson("patients/" + encodeURIComponent(id), { headers: { Accept: "application/fhir+json" } });
    if (seq !== state.seq) return;
    if (!result.ok || !result.body || result.body.resourceType !== "Bundle") {
      setStatus("The record could not be loaded (HTTP " + result.status + ").", true);
      return;
    }
    state.patient = entry;
    state.today = (result.body.timestamp || new Date().toISOString()).slice(0, 10);
    state.resources = (result.body.entry || []).map(function (e) {
      var r = e.resource;
      Object.defineProperty(r, "__fullUrl", { value: (e.fullUrl || "").replace(/^urn:uuid:/, ""), enumerable: false });
      return r;
    });
    renderSummary();
    renderOrderChoices();
    setStatus("Choose an order: the service is asked as soon as you choose.");
  }

  function patientResource() { return state.resources.find(function (r) { return r.resourceType === "Patient"; }) || {}; }

  function patientName(p) {
    var name = (p.name || [])[0];
    if (!name) return null;
    return name.text || ((name.given || []).join(" ") + " " + (name.family || "")).trim();
  }

  function renderSummary() {
    var box = $("patient-summary");
    clear(box);
    var p = patientResource();
    var entry = state.patient;
    var name = patientName(p) || (entry.kind === "vignette" ? "Vignette " + entry.label.split(" ")[0] : p.id);
    var demographics = [entry.age !== null ? entry.age + " years" : "age unknown", entry.sex];
    var mrn = (p.identifier || [])[0];
    if (mrn) demographics.push("MRN " + mrn.value);
    if (p.birthDate) demographics.push("born " + p.birthDate);
    box.appendChild(el("h3", { text: name }));
    box.appendChild(el("p", { className: "demographics", text: demographics.join(" · ") }));
    box.appendChild(el("p", { className: "one-line", text: entry.summary }));

    var conditions = byType("Condition");
    var active = conditions.filter(function (c) { var s = statusOf(c.clinicalStatus); return !s || ACTIVE_CONDITION.indexOf(s) >= 0; });
    var past = conditions.filter(function (c) { return active.indexOf(c) < 0; });
    var meds = byType("MedicationRequest").concat(byType("MedicationStatement"));
    var currentMeds = latestPerName(meds.filter(function (m) { return ACTIVE_MEDICATION.indexOf(m.status) >= 0; }), function (m) { return concept(m.medicationCodeableConcept); });
    var procedures = latestPerName(byType("Procedure"), function (r) { return concept(r.code); });
    var temps = byType("Observation").filter(function (o) { return (o.code.coding || []).some(function (c) { return c.code === "8310-5" || c.code === "8331-1"; }); });
    temps.sort(function (a, b) { return resourceDate(b).localeCompare(resourceDate(a)); });

    var dl = el("dl");
    addRow(dl, "Active problems", listOf(sortByDateDesc(active).map(function (c) { return concept(c.code) + when(c); })));
    addRow(dl, "Medications", listOf(currentMeds.map(function (m) { return describe(m) + (m.count > 1 ? " (" + m.count + " orders, since " + m.first.slice(0, 4) + ")" : when(m.latest)); })));
    if (past.length) addRow(dl, "Past history", listOf(sortByDateDesc(past).slice(0, 6).map(function (c) { return concept(c.code) + " (" + statusOf(c.clinicalStatus) + ", " + resourceDate(c).slice(0, 4) + ")"; })));
    if (procedures.length) addRow(dl, "Procedures", listOf(procedures.slice(0, 5).map(function (g) { return g.name + (g.count > 1 ? " ×" + g.count + ", last " : " ") + ago(resourceDate(g.latest)); })));
    if (temps.length) addRow(dl, "Temperature", el("span", { text: observationValue(temps[0]).slice(2) + ", " + ago(resourceDate(temps[0])) + (temps.length > 1 ? " (" + temps.length + " readings in the record)" : "") }));
    box.appendChild(dl);

    var dated = state.resources.filter(function (r) { return r.resourceType !== "Patient"; });
    var years = dated.map(resourceDate).filter(Boolean).map(function (d) { return d.slice(0, 4); }).sort();
    var span = !years.length ? "" : years[0] === years[years.length - 1] ? ", " + years[0] : ", " + years[0] + " to " + years[years.length - 1];
    var details = el("details", { className: "record" }, [
      el("summary", { text: "Full record: " + dated.length + (dated.length === 1 ? " resource" : " resources") + span }),
      timeline(dated),
    ]);
    box.appendChild(details);
    box.hidden = false;
  }

  function byType(type) { return state.resources.filter(function (r) { return r.resourceType === type; }); }

  function when(r) { var d = resourceDate(r); return d ? " (" + ago(d) + ")" : ""; }

  function sortByDateDesc(list) { return list.slice().sort(function (a, b) { return resourceDate(b).localeCompare(resourceDate(a)); }); }

  function latestPerName(list, nameOf) {
    var groups = {};
    list.forEach(function (r) {
      var name = nameOf(r);
      var g = groups[name] || (groups[name] = { name: name, count: 0, latest: r, first: resourceDate(r) });
      g.count++;
      if (resourceDate(r) > resourceDate(g.latest)) g.latest = r;
      if (resourceDate(r) < g.first) g.first = resourceDate(r);
    });
    return Object.keys(groups).map(function (k) {
      var g = groups[k];
      return Object.assign(Object.create(g.latest), g.latest, { count: g.count, latest: g.latest, first: g.first, name: g.name });
    }).sort(function (a, b) { return resourceDate(b.latest).localeCompare(resourceDate(a.latest)); });
  }

  function listOf(items) {
    if (!items.length) return el("span", { className: "muted", text: "none recorded" });
    return el("ul", { className: "facts" }, items.map(function (t) { return el("li", { text: t }); }));
  }

  function addRow(dl, term, value) { dl.appendChild(el("dt", { text: term })); dl.appendChild(el("dd", {}, [value])); }

  function timeline(resources) {
    var rows = sortByDateDesc(resources).map(function (r) {
      var status = r.clinicalStatus ? statusOf(r.clinicalStatus) : (r.status || "");
      return el("tr", {}, [el("td", { className: "date", text: resourceDate(r).slice(0, 10) }), el("td", { text: r.resourceType }), el("td", { text: describe(r) }), el("td", { text: status })]);
    });
    var table = el("table", { className: "timeline" }, [
      el("caption", { className: "visually-hidden", text: "The patient's record, newest first" }),
      el("thead", {}, [el("tr", {}, ["Date", "Type", "What", "Status"].map(function (h) { return el("th", { scope: "col", text: h }); }))]),
      el("tbody", {}, rows),
    ]);
    return el("div", { className: "timeline-wrap", tabindex: "0", role: "region", "aria-label": "Full record" }, [table]);
  }

  // ---------------------------------------------------------------- orders
  function orderChoices() {
    var choices = ORDER_CHOICES.slice();
    var scenario = state.patient && state.patient.order;
    if (scenario) {
      var same = choices.find(function (c) { return c.system === scenario.system && c.code === scenario.code; });
      if (same) same = Object.assign({}, same, { scenario: true });
      choices = choices.map(function (c) { return same && c.key === same.key ? same : c; });
      if (!same) choices.push({ key: "scenario", system: scenario.system, code: scenario.code, display: scenario.display, label: scenario.display, scenario: true });
    }
    return choices;
  }

  function renderOrderChoices() {
    var box = $("order-options");
    clear(box);
    var fieldset = $("order-choices");
    if (!state.patient) {
      fieldset.disabled = true;
      box.appendChild(el("p", { className: "muted", text: "Choose a patient first." }));
      return;
    }
    fieldset.disabled = false;
    var picked = state.drafts.find(function (d) { return d.id === state.pickedId; });
    orderChoices().forEach(function (choice) {
      var id = "order-" + choice.key;
      var input = el("input", { type: "radio", name: "order", id: id, value: choice.key, "data-code": choice.code });
      if (picked && picked.__choice === choice.key) input.checked = true;
      input.addEventListener("change", function () { if (input.checked) pickOrder(choice); });
      var label = el("label", { for: id }, [choice.label, " ", el("span", { className: "order-code", text: "(" + codeLabel(choice) + ")" })]);
      if (choice.scenario) label.appendChild(el("span", { className: "tag", text: "scenario" }));
      box.appendChild(el("div", { className: "order-option" }, [input, label]));
    });
  }

  function newDraftId() { state.counter++; return "demo-draft-" + state.counter + "-" + uuid4().slice(0, 8); }

  function pickOrder(choice) {
    var draft = {
      resourceType: "ServiceRequest",
      id: newDraftId(),
      status: "draft",
      intent: "order",
      code: { coding: [{ system: choice.system, code: choice.code, display: choice.display }], text: choice.display },
      subject: { reference: "Patient/" + state.patient.id },
      requester: { reference: USER_ID },
      authoredOn: state.today,
    };
    Object.defineProperty(draft, "__choice", { value: choice.key, enumerable: false, writable: true });
    // One imaging order from the picker at a time: choosing another replaces it.
    state.drafts = state.drafts.filter(function (d) { return d.id !== state.pickedId; });
    state.drafts.push(draft);
    state.pickedId = draft.id;
    state.pendingSign = false;
    $("confirm-sign-button").hidden = true;
    $("sign-status").textContent = "";
    renderOrders();
    callHook("order-select", [draft]);
  }

  function renderOrders() {
    var list = $("draft-orders");
    clear(list);
    state.drafts.forEach(function (d) {
      var text = el("span", { className: "order-text" }, [concept(d.code)]);
      if (d.priority === "stat" || d.priority === "asap" || d.priority === "urgent") text.appendChild(el("span", { className: "priority", text: " · " + d.priority.toUpperCase() }));
      var remove = el("button", { type: "button", "aria-label": "Remove draft order: " + concept(d.code), text: "Remove" });
      remove.addEventListener("click", function () { removeDraft(d.id); setSignStatus("Removed: " + concept(d.code)); });
      list.appendChild(el("li", { "data-order-id": d.id, "data-code": ((d.code.coding || [])[0] || {}).code || "" }, [text, el("span", { className: "order-code", text: d.status }), remove]));
    });
    $("no-drafts").hidden = state.drafts.length > 0;
    $("sign-button").disabled = !state.drafts.length;
    var signed = $("signed-orders");
    clear(signed);
    state.signed.forEach(function (d) { signed.appendChild(el("li", { "data-order-id": d.id }, [el("span", { className: "order-text", text: concept(d.code) }), el("span", { className: "order-code", text: d.status })])); });
    $("signed-block").hidden = !state.signed.length;
  }

  function removeDraft(id) {
    state.drafts = state.drafts.filter(function (d) { return d.id !== id; });
    if (id === state.pickedId) {
      state.pickedId = null;
      var checked = document.querySelector("#order-options input:checked");
      if (checked) checked.checked = false;
    }
    renderOrders();
  }

  function draftBundle() {
    return { resourceType: "Bundle", type: "collection", entry: state.drafts.map(function (d) { return { resource: strip(d) }; }) };
  }

  // ---------------------------------------------------------------- hooks
  async function callHook(hook, selected) {
    var service = hook === "order-select" ? state.selectService : state.signService;
    if (!service || !state.patient) { setStatus("The service publishes no " + hook + " service.", true); return; }
    var seq = ++state.seq;
    var context = { userId: USER_ID, patientId: state.patient.id };
    if (hook === "order-select") context.selections = selected.map(function (d) { return "ServiceRequest/" + d.id; });
    context.draftOrders = draftBundle();
    var request = { hookInstance: uuid4(), hook: hook, context: context, prefetch: buildPrefetch(service, context) };
    $("last-request").textContent = "POST ../cds-services/" + service.id + "\n" + pretty(request);
    $("cards").setAttribute("aria-busy", "true");
    setStatus("Asking the CDS service (" + hook + ")…");
    var started = performance.now();
    var result;
    try {
      result = await fetchJson("../cds-services/" + encodeURIComponent(service.id), {
        method: "POST", headers: { "Content-Type": "application/json", Accept: "application/json" }, body: JSON.stringify(request),
      });
    } catch (err) {
      result = { status: 0, ok: false, body: String(err) };
    }
    if (seq !== state.seq) return null;  // a newer call (or another patient) took over
    var elapsed = Math.round(performance.now() - started);
    $("cards").setAttribute("aria-busy", "false");
    $("last-response").textContent = "HTTP " + result.status + " (" + elapsed + " ms)\n" + pretty(result.body);
    if (!result.ok || !result.body || !Array.isArray(result.body.cards)) {
      showError(hook, result);
      return null;
    }
    renderCards(hook, result.body.cards, service, elapsed);
    return result.body.cards;
  }

  function showError(hook, result) {
    var box = $("cards");
    clear(box);
    var message = result.status ? "The service answered HTTP " + result.status + " to " + hook + "." : "The service could not be reached.";
    box.appendChild(el("div", { className: "error-box", "data-status": result.status }, [
      el("strong", { text: message }), el("p", { text: outcomeMessage(result.body) || "No details." }),
    ]));
    setStatus(message, true);
  }

  function sortCards(cards) {
    return cards.map(function (c, i) { return { c: c, i: i }; }).sort(function (a, b) {
      var x = INDICATOR_ORDER[a.c.indicator], y = INDICATOR_ORDER[b.c.indicator];
      return (x === undefined ? 3 : x) - (y === undefined ? 3 : y) || a.i - b.i;
    }).map(function (x) { return x.c; });
  }

  function renderCards(hook, cards, service, elapsed) {
    var box = $("cards");
    clear(box);
    $("cds-alert").textContent = "";
    var time = new Date().toLocaleTimeString();
    if (!cards.length) {
      box.appendChild(el("div", { className: "no-cards", "data-hook": hook }, [
        el("strong", { text: "No cards" }),
        el("span", { text: "The service has no advice for " + (hook === "order-sign" ? "these orders" : "this order") + " (" + hook + ", " + time + ", " + elapsed + " ms)." }),
      ]));
      setStatus("No cards for " + hook + ".");
      return;
    }
    box.appendChild(el("p", { className: "cards-heading", text: (hook === "order-sign" ? "Cards on signing" : "Cards on order selection") + " · " + time + " · " + elapsed + " ms" }));
    var sorted = sortCards(cards);
    sorted.forEach(function (card) { box.appendChild(renderCard(card, service, hook)); });
    var top = sorted[0];
    setStatus(cards.length + (cards.length === 1 ? " card" : " cards") + " from " + hook + ", most urgent: " + (INDICATOR_TEXT[top.indicator] || top.indicator) + ".");
    if (top.indicator === "critical") $("cds-alert").textContent = "Critical: " + top.summary;
  }

  function cardKey(card) { return ((card.source && card.source.topic && card.source.topic.code) || "") + "|" + card.summary; }

  function renderCard(card, service, hook) {
    var indicator = INDICATOR_TEXT[card.indicator] ? card.indicator : "info";
    var summaryId = "card-" + (card.uuid || uuid4()) + "-" + hook;
    var topic = card.source && card.source.topic ? card.source.topic.code : "";
    var article = el("article", { className: "card " + indicator, "aria-labelledby": summaryId, "data-card-type": topic, "data-indicator": card.indicator, "data-uuid": card.uuid || "" });
    article.appendChild(el("div", { className: "card-head" }, [
      el("span", { className: "badge " + indicator, text: INDICATOR_TEXT[indicator] }),
      el("h3", { className: "card-summary", id: summaryId, text: card.summary }),
    ]));
    if (card.source) {
      var source = el("p", { className: "card-source" }, ["Source: "]);
      source.appendChild(card.source.url && /^https?:\/\//.test(card.source.url)
        ? el("a", { href: card.source.url, target: "_blank", rel: "noopener noreferrer", text: card.source.label })
        : document.createTextNode(card.source.label || ""));
      if (card.source.icon && /^https:\/\//.test(card.source.icon)) source.insertBefore(el("img", { src: card.source.icon, alt: "", width: 16, height: 16 }), source.firstChild);
      article.appendChild(source);
    }
    var previous = hook === "order-sign" ? state.addressed[cardKey(card)] : null;
    if (previous) article.appendChild(el("p", { className: "card-repeat", text: "Same advice as at order selection: " + previous + "." }));

    var buttons = el("div", { className: "card-buttons" });
    var outcome = el("p", { className: "card-outcome", role: "status" });
    var form = null;
    (card.suggestions || []).forEach(function (suggestion) {
      var button = el("button", { type: "button", className: "suggestion" + (suggestion.isRecommended ? " primary" : ""), "data-suggestion": suggestion.uuid || "" },
        [suggestion.label, suggestion.isRecommended ? el("span", { className: "visually-hidden", text: " (recommended)" }) : null]);
      button.addEventListener("click", function () { acceptSuggestion(card, suggestion, service, article, outcome, button); });
      buttons.appendChild(button);
    });
    if (card.uuid) {
      var override = el("button", { type: "button", className: "override", "aria-expanded": "false", text: "Override" });
      override.addEventListener("click", function () {
        if (!form) { form = overrideForm(card, service, article, outcome, override); article.insertBefore(form, outcome.nextSibling); }
        var open = form.hidden;
        form.hidden = !open;
        override.setAttribute("aria-expanded", String(open));
        if (open) { var first = form.querySelector("input, textarea"); if (first) first.focus(); }
      });
      buttons.appendChild(override);
    }
    if (buttons.children.length) article.appendChild(buttons);
    article.appendChild(outcome);

    if (card.detail) {
      var detail = el("details", { className: "card-detail" }, [el("summary", { text: "Details" })]);
      if (card.indicator === "critical" && !previous) detail.open = true;
      var body = el("div", { className: "markdown" });
      body.appendChild(window.CdsMarkdown.render(card.detail));
      detail.appendChild(body);
      article.appendChild(detail);
    }
    if (card.links && card.links.length) {
      article.appendChild(el("ul", { className: "card-links", "aria-label": "Links" }, card.links.map(function (link) {
        if (link.type === "absolute" && /^https?:\/\//.test(link.url)) {
          return el("li", {}, [el("a", { href: link.url, target: "_blank", rel: "noopener noreferrer", text: link.label })]);
        }
        return el("li", { text: link.label + " (SMART app: not launched in this demo)" });
      })));
    }
    return article;
  }

  function finishCard(article, outcome, kind, text) {
    article.classList.add("done");
    article.querySelectorAll(".card-buttons button").forEach(function (b) { b.disabled = true; });
    outcome.className = "card-outcome " + kind;
    outcome.textContent = text;
  }

  async function sendFeedback(service, item) {
    var body = { feedback: [item] };
    $("last-feedback").textContent = "POST ../cds-services/" + service.id + "/feedback\n" + pretty(body);
    try {
      var result = await fetchJson("../cds-services/" + encodeURIComponent(service.id) + "/feedback", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      });
      $("last-feedback").textContent += "\n\nHTTP " + result.status + "\n" + pretty(result.body);
      return result;
    } catch (err) {
      return { ok: false, status: 0, body: String(err) };
    }
  }

  async function acceptSuggestion(card, suggestion, service, article, outcome, button) {
    var changes = applyActions(suggestion.actions || []);
    if (card.selectionBehavior === "any") { button.disabled = true; } else { finishCard(article, outcome, "accepted", ""); }
    outcome.className = "card-outcome accepted";
    outcome.textContent = "Accepted: " + suggestion.label + (changes.length ? ". " + changes.join("; ") + "." : ".");
    state.addressed[cardKey(card)] = "accepted (" + suggestion.label + ")";
    if (card.uuid && suggestion.uuid) {
      var result = await sendFeedback(service, { card: card.uuid, outcome: "accepted", acceptedSuggestions: [{ id: suggestion.uuid }], outcomeTimestamp: new Date().toISOString() });
      if (!result.ok) { outcome.className = "card-outcome failed"; outcome.textContent += " Feedback could not be sent (HTTP " + result.status + ")."; }
      else outcome.setAttribute("data-feedback", "sent");
    }
  }

  // CDS Hooks actions on the draft order list: delete by resourceId, create with a new id, update by id.
  function applyActions(actions) {
    var changes = [];
    actions.forEach(function (action) {
      if (action.type === "delete") {
        var ref = action.resourceId || (typeof action.resource === "string" ? action.resource : "");
        var id = ref.split("/").pop();
        var gone = state.drafts.find(function (d) { return d.id === id; });
        if (gone) { removeDraft(id); changes.push("removed " + concept(gone.code)); }
      } else if (action.type === "create" && action.resource && typeof action.resource === "object") {
        var created = strip(action.resource);
        created.id = newDraftId();
        if (!created.subject && state.patient) created.subject = { reference: "Patient/" + state.patient.id };
        state.drafts.push(created);
        changes.push("added " + concept(created.code || created.medicationCodeableConcept));
      } else if (action.type === "update" && action.resource && typeof action.resource === "object") {
        var updated = strip(action.resource);
        var index = state.drafts.findIndex(function (d) { return d.resourceType === updated.resourceType && d.id === updated.id; });
        if (index >= 0) {
          var choice = state.drafts[index].__choice;
          Object.defineProperty(updated, "__choice", { value: choice, enumerable: false, writable: true });
          state.drafts[index] = updated;
        } else {
          state.drafts.push(updated);
        }
        changes.push("updated " + concept(updated.code) + (updated.priority ? " (priority " + updated.priority + ")" : ""));
      }
    });
    renderOrders();
    return changes;
  }

  function overrideForm(card, service, article, outcome, overrideButton) {
    var formId = "override-" + (card.uuid || uuid4());
    var form = el("form", { className: "override-form", hidden: true, "aria-label": "Override: " + card.summary });
    var reasons = card.overrideReasons || [];
    var fieldset = el("fieldset", {}, [el("legend", { text: "Why are you overriding this advice?" })]);
    reasons.forEach(function (reason, i) {
      var id = formId + "-reason-" + i;
      fieldset.appendChild(el("div", { className: "reason" }, [
        el("input", { type: "radio", name: formId + "-reason", id: id, value: String(i) }),
        el("label", { for: id, text: reason.display || reason.code }),
      ]));
    });
    var commentId = formId + "-comment";
    fieldset.appendChild(el("label", { for: commentId, text: reasons.length ? "Comment (optional)" : "Comment" }));
    fieldset.appendChild(el("textarea", { id: commentId, rows: 2, maxlength: 500 }));
    form.appendChild(fieldset);
    var error = el("p", { className: "form-error", role: "alert" });
    form.appendChild(error);
    var cancel = el("button", { type: "button", text: "Cancel" });
    cancel.addEventListener("click", function () { form.hidden = true; overrideButton.setAttribute("aria-expanded", "false"); overrideButton.focus(); });
    form.appendChild(el("div", { className: "form-buttons" }, [el("button", { type: "submit", className: "primary", text: "Submit override" }), cancel]));
    form.addEventListener("submit", async function (event) {
      event.preventDefault();
      var chosen = form.querySelector("input[type=radio]:checked");
      var comment = form.querySelector("textarea").value.trim();
      if (!chosen && !comment) { error.textContent = reasons.length ? "Choose a reason (or write a comment)." : "Write a comment."; return; }
      error.textContent = "";
      var reason = chosen ? reasons[+chosen.value] : null;
      var overrideReason = {};
      if (reason) overrideReason.reason = { system: reason.system, code: reason.code, display: reason.display };
      if (comment) overrideReason.userComment = comment;
      form.hidden = true;
      var text = "Overridden: " + (reason ? reason.display || reason.code : "comment") + (comment ? " (“" + comment + "”)" : "");
      finishCard(article, outcome, "overridden", text + ".");
      state.addressed[cardKey(card)] = "overridden (" + (reason ? reason.display || reason.code : comment) + ")";
      var result = await sendFeedback(service, { card: card.uuid, outcome: "overridden", overrideReason: overrideReason, outcomeTimestamp: new Date().toISOString() });
      if (!result.ok) { outcome.className = "card-outcome failed"; outcome.textContent = text + ". Feedback could not be sent (HTTP " + result.status + ")."; }
      else { outcome.setAttribute("data-feedback", "sent"); outcome.textContent = text + ". Feedback sent."; }
      outcome.setAttribute("tabindex", "-1");
      outcome.focus();
    });
    return form;
  }

  // ---------------------------------------------------------------- signing
  async function sign() {
    if (!state.drafts.length) return;
    setSignStatus("Signing: asking the CDS service (order-sign)…");
    var cards = await callHook("order-sign", []);
    if (cards === null) { setSignStatus("Not signed: the service call failed."); return; }
    if (!cards.length) { completeSign(); return; }
    state.pendingSign = true;
    $("confirm-sign-button").hidden = false;
    setSignStatus("The service returned " + cards.length + (cards.length === 1 ? " card" : " cards") + " on signing. Act on " + (cards.length === 1 ? "it" : "them") + ", or sign anyway.");
  }

  function confirmSign() { if (state.pendingSign) completeSign(); }

  function completeSign() {
    var count = state.drafts.length;
    state.drafts.forEach(function (d) { d.status = "active"; state.signed.push(d); });
    state.drafts = [];
    state.pickedId = null;
    state.pendingSign = false;
    $("confirm-sign-button").hidden = true;
    var checked = document.querySelector("#order-options input:checked");
    if (checked) checked.checked = false;
    renderOrders();
    setSignStatus("Signed " + count + (count === 1 ? " order" : " orders") + ". (Demo: nothing is sent to any EHR.)", true);
  }

  function setSignStatus(text, done) {
    var status = $("sign-status");
    status.textContent = text;
    status.className = done ? "done" : "";
  }

  function setStatus(text, isError) {
    var status = $("cds-status");
    status.textContent = text;
    status.className = isError ? "error" : "";
  }

  window.CdsDemo = { state: state, fillTemplate: fillTemplate, buildPrefetch: buildPrefetch };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start); else start();
})();
