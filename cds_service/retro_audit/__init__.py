"""`python -m cds_service audit SOURCE`: the service's rules applied to past lumbar imaging orders.

SOURCE is a FHIR Bulk Data export folder (NDJSON files, one resource per line, any file names:
Patient.ndjson, Condition-1.ndjson, 1.Observation.ndjson, *.ndjson.gz) or a FHIR R4 server base URL.
Every past order (a ServiceRequest coded as lumbar spine MRI, CT or X-ray, not draft or
entered-in-error, intent an order) is evaluated by `cards.engine.Engine.evaluate`, the same call as the
HTTP service, with today = the order's date (authoredOn), the order as the draft order, and the
patient's record as it was on that date:

- A resource counts only if none of its dates is after the order: Condition onset and recordedDate,
  Observation effective and issued, MedicationRequest authoredOn, MedicationStatement dateAsserted and
  effective, the start of any period or dosage bounds, Procedure performed, ServiceRequest authoredOn.
  Dates are compared as calendar dates as written; on the order's own day, a resource whose date
  carries a time and zone counts only if it is not later than the order's authoredOn (an MRI finding
  coded two hours after the order does not justify it). A date without a time counts on that day.
- A Condition resolved after the order (abatement after the order date) was current on that date:
  it is read as active. Other status changes cannot be dated from an export (no history) and are
  taken as exported.
- Undated resources (none of those dates) are included by default (`--undated include`): undated
  entries are mostly migrated problem-list history (a cancer, an operation) that was in the chart
  when the order was placed; the engine already treats an unknown date as "not recent" for every
  windowed criterion; and including them can only add red flags, so the audit never overstates the
  orders that would have been warned against. `--undated exclude` drops them. Either way the number
  used is reported per order (undated_used) and in the summary.
- Patient (birth date) and Medication (a catalogue, referenced by medicationReference) are undated
  by nature and always used.

Outputs: a summary on the terminal; per-order results (--out, CSV when the name ends in .csv, else
NDJSON); an HTML report with inline SVG charts (--html, no script, no CDN); the summary as JSON
(--summary-json). The per-order file holds patient and order ids from the source: handle it as the
export itself. The HTML report and the summary are aggregate counts without identifiers.

How an export is grouped by patient with flat memory, on all cores:

  pass 1 (partition)  the files are cut into line-aligned byte ranges; worker processes read them,
                      decode only resourceType / id / subject of each line (msgspec), and append the
                      raw line to the worker's own SQLite shard, keyed by (crc32(patient id), patient
                      id); Medication lines go to a side table. Lines of other types are skipped.
  index               each shard is indexed by (hash, patient): SQLite's external sort, bounded memory.
  pass 2 (evaluate)   the hash space is cut into ranges (partitions of ~256 patients); for each range a
                      worker merges the shards' index-ordered cursors (heapq.merge), so one patient's
                      lines arrive together, evaluates that patient, and drops it. Results return per
                      partition, in partition order: the output is sorted by (hash, patient id) whatever
                      the number of workers.

Memory is one patient's record per worker plus one partition's result rows; disk is about the size of
the export. A byte-offset index per patient would avoid the copy but needs the index itself on disk and
random reads across every file; the SQLite shards are the same external sort, written in parallel.
`audit_patient` is the unit of work: given one patient's resources it returns that patient's rows and
counts, with no I/O; it is what a Dask or Spark job would map over patient partitions.

The FHIR server source pages through `ServiceRequest?code=<lumbar imaging codes>`, and for each new
patient runs the service's own prefetch queries (services.yaml) through `FhirClient`: the allow-list
(CDS_FHIR_SERVER_ALLOWLIST, loopback only when unset), no redirects, size caps, `next` links only on
the same server, the token in the Authorization header only, never logged. A query that fails makes its
resource type unreadable for that patient, exactly as in a hook call (imaging-data-incomplete).

The package, in the order of the data:

  cli          the `audit` command: arguments, the run, the output files, the terminal summary
  shards       pass 1 over an export (byte ranges -> per-process SQLite shards, indexed by patient)
  evaluate     pass 2 over an export (one hash range: patients merged from the shards and audited)
  export       both passes over a pool of worker processes, in partition order
  fhir_server  a FHIR server as the source
  patient      `audit_patient`, the unit of work: one patient's orders -> rows and counts, no I/O
  as_of        the record as it stood on an order's date
  hedis        the HEDIS-style rate (new back pain diagnoses, imaging within 28 days)
  references   patient and Medication references, resources de-duplicated
  model        card types, the policy, AuditError, the counters and AuditRun that every part shares
  writers      the per-order CSV or NDJSON file
  summary      the summary JSON and the terminal table
  html_report  the HTML report
  progress     the progress bar and peak memory
"""

from __future__ import annotations

from .as_of import UNDATED_TYPES, AsOfStats, Moment, dated, is_after, moment, record_as_of, record_dates
from .cli import add_audit_arguments, main_audit, run_audit
from .evaluate import HASH_SPACE, PATIENTS_PER_PARTITION, audit_partition, hash_ranges
from .export import PARALLEL_PARTITION_BYTES, audit_export, default_workers
from .fhir_server import audit_fhir_server
from .hedis import EPISODE_GROUP, HEDIS_AGES, HEDIS_NEGATIVE_HISTORY_DAYS, HEDIS_WINDOW_DAYS, NOT_PERFORMED_STATUSES
from .html_report import CARD_COLOURS, render_html
from .model import (CARD_LABELS, CARD_ORDER, CES, EPISODE_BINS, INCOMPLETE, INDICATED, NO_CARD, NOT_INDICATED, AuditError,
                    AuditPolicy, AuditRun, merge_summary, new_summary)
from .patient import NOT_ORDER_INTENTS, NOT_PLACED_STATUSES, PatientAudit, audit_patient
from .progress import peak_rss_mb
from .references import patient_reference
from .shards import (CHUNK_BYTES, INSERT_BATCH, PATIENT_TYPES, REFERENCED_TYPES, export_files, index_shard, partition_chunk,
                     patient_hash, plan_chunks)
from .summary import render_summary, summary_json
from .writers import CSV_COLUMNS, ResultWriter

__all__ = [
    # the command
    "add_audit_arguments", "main_audit", "run_audit",
    # the unit of work and the record as of a date
    "audit_patient", "PatientAudit", "AuditPolicy", "AuditError", "Moment", "moment", "is_after", "record_dates", "dated",
    "record_as_of", "AsOfStats", "UNDATED_TYPES", "patient_reference",
    # the sources
    "audit_export", "audit_fhir_server", "AuditRun", "default_workers", "export_files", "plan_chunks", "partition_chunk",
    "patient_hash", "index_shard", "audit_partition", "hash_ranges",
    # the outputs
    "ResultWriter", "summary_json", "render_summary", "render_html", "new_summary", "merge_summary", "peak_rss_mb",
    # constants
    "CES", "INDICATED", "NOT_INDICATED", "INCOMPLETE", "NO_CARD", "CARD_LABELS", "CARD_ORDER", "CARD_COLOURS",
    "PATIENT_TYPES", "REFERENCED_TYPES", "NOT_PLACED_STATUSES", "NOT_PERFORMED_STATUSES", "NOT_ORDER_INTENTS", "EPISODE_GROUP",
    "HEDIS_NEGATIVE_HISTORY_DAYS", "HEDIS_WINDOW_DAYS", "HEDIS_AGES", "EPISODE_BINS", "CSV_COLUMNS", "PATIENTS_PER_PARTITION",
    "CHUNK_BYTES", "PARALLEL_PARTITION_BYTES", "INSERT_BATCH", "HASH_SPACE",
]
