"""The in-memory Medplum FHIR R4 test server (server.mjs) and its Python launcher."""
