// Parses and validates an AsyncAPI document with @asyncapi/parser (the library the AsyncAPI CLI
// and generator use): schema, spec rules and $refs, relative files included. The parser has no
// schema parser for JSON Schema 2020-12 (our payloads) and would pass them through unchecked, so
// one is registered here that compiles each such schema with Ajv (strict). Prints every
// diagnostic; exits 1 when the document has errors (warnings are printed, not failed on).
//   node validate.js FILE
'use strict';
const path = require('path');
const { Parser, fromFile, DiagnosticSeverity } = require('@asyncapi/parser');
const Ajv2020 = require('ajv/dist/2020').default;
const addFormats = require('ajv-formats').default;

// Errors found in 2020-12 payload schemas (the parser's v3 path only calls parse(), so they are
// collected here and reported with the parser's own diagnostics).
const schemaErrors = [];

function jsonSchema2020Parser() {
  const formats = ['application/schema+json;version=2020-12', 'application/schema+yaml;version=2020-12'];
  const check = (input) => {
    const ajv = new Ajv2020({ strict: true, allErrors: true, validateFormats: true });
    addFormats(ajv);
    try {
      ajv.compile(input.data);
    } catch (e) {
      schemaErrors.push({ path: input.path.join('.'), message: e.message });
    }
  };
  return {
    getMimeTypes: () => formats,
    validate: async (input) => {
      check(input);
      return [];
    },
    parse: async (input) => {
      check(input);
      return input.data;
    },
  };
}

async function main() {
  const file = process.argv[2];
  if (!file) {
    console.error('usage: node validate.js FILE');
    process.exit(2);
  }
  const parser = new Parser();
  parser.registerSchemaParser(jsonSchema2020Parser());
  const { document, diagnostics } = await fromFile(parser, path.resolve(file)).parse();
  const names = { [DiagnosticSeverity.Error]: 'error', [DiagnosticSeverity.Warning]: 'warning',
    [DiagnosticSeverity.Information]: 'info', [DiagnosticSeverity.Hint]: 'hint' };
  let errors = 0;
  let others = 0;
  for (const d of diagnostics) {
    if (d.severity === DiagnosticSeverity.Error) errors++;
    else others++;
    const where = d.range ? `${d.range.start.line + 1}:${d.range.start.character + 1}` : '?';
    const at = d.path && d.path.length ? ` (${d.path.join('.')})` : '';
    console.log(`${names[d.severity] || d.severity} ${file}:${where} ${d.code}: ${d.message}${at}`);
  }
  for (const e of schemaErrors) {
    errors++;
    console.log(`error ${file} json-schema-2020-12: ${e.message} (${e.path})`);
  }
  if (errors > 0 || !document) {
    console.log(`validate-asyncapi: FAILED: ${file}: ${errors} error(s), ${others} other diagnostic(s)`);
    process.exit(1);
  }
  const count = (c) => (c && typeof c.length === 'number' ? c.length : (c && c.all ? c.all().length : 0));
  console.log(`validate-asyncapi: OK: ${file}: AsyncAPI ${document.version()}, ` +
    `${count(document.allChannels())} channels, ${count(document.allOperations())} operations, ` +
    `${count(document.allMessages())} messages; ${others} warning(s)/hint(s)`);
}

main().catch((e) => {
  console.log(`validate-asyncapi: FAILED: ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
