#!/usr/bin/env node
// scripts/record_sentencepiece_fixture.mjs — records llama.cpp's own
// tokenization of a set of texts, for tests/sentencepiece_fixture.hpp (the
// fixture of tests/test_sentencepiece.cpp). Not needed by the build.
//
// usage: NODE_LLAMA_CPP_DIR=DIR node scripts/record_sentencepiece_fixture.mjs \
//            TOK512.gguf LLAMA2.gguf > tests/sentencepiece_fixture.hpp
// DIR: a folder whose node_modules holds node-llama-cpp 3.21.1. The GGUF files
// only need the vocabularies: the peer's llama2c_to_gguf.py run on any
// checkpoint with 512 (resp. 32000) tokens and tok512.bin (resp.
// llama2_tokenizer.bin); scripts/record_sentencepiece_fixture.sh makes them.
// For each text: model.tokenize(text, false), which is llama.cpp's
// common_tokenize(vocab, text, add_special = false, parse_special = false),
// and model.detokenize(ids, false) of those ids with and without BOS in
// front, which is llama_detokenize(remove_special = false, unparse_special = false).
import path from "node:path";
import {pathToFileURL} from "node:url";

const TEXTS = [
    "", "a", "Hello", "Hello world", "The cat sat on the mat.",
    "Once upon a time, there was a little girl named Lily.",
    " leading space", "trailing space ", "  two leading spaces", "multiple   spaces   inside",
    " ", "   ", "  Hello  ", "line one\nline two", "\n", "\n\nTwo newlines first", "tab\tseparated",
    "\r\nCRLF", "1234567890", "3.14159 and 2,718", "Punctuation!? Yes: (a) [b] {c}; \"quoted\" 'single' -dash- ...",
    "~`@#$%^&*_+=|\\/<>", "caf\u00e9", "na\u00efve r\u00e9sum\u00e9", "\u00c6\u00d8\u00c5 \u00e6\u00f8\u00e5",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8", "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440",
    "\u03a9\u2248\u00e7\u221a\u222b", "emoji \u{1F600} here", "\u{1F999}\u{1F680}", "mixed: a\u{1F600}b",
    "\u00a0nbsp", "<s> not a control token </s>", "<0x41> literal", "\u2581already escaped",
    "I think, therefore I am.",
];

const [tok512Path, llama2Path] = process.argv.slice(2);
if (!tok512Path || !llama2Path) {
    console.error("usage: node record_sentencepiece_fixture.mjs TOK512.gguf LLAMA2.gguf");
    process.exit(2);
}
const dir = process.env.NODE_LLAMA_CPP_DIR;
const nlc = dir
    ? await import(pathToFileURL(path.join(dir, "node_modules", "node-llama-cpp", "dist", "index.js")).href)
    : await import("node-llama-cpp");
const llama = await nlc.getLlama({gpu: false, build: "never", skipDownload: true, logLevel: nlc.LlamaLogLevel.error});

// A C++ string literal of the UTF-8 bytes: printable ASCII as is, the rest as
// 3-digit octal escapes (which cannot run into the next character).
function cpp(text) {
    let out = "\"";
    for (const b of Buffer.from(text, "utf8")) {
        if (b === 0x22 || b === 0x5c) out += "\\" + String.fromCharCode(b);
        else if (b >= 0x20 && b < 0x7f && b !== 0x3f) out += String.fromCharCode(b);  // '?': no trigraphs
        else out += "\\" + b.toString(8).padStart(3, "0");
    }
    return out + "\"";
}

const lines = [];
const w = (s) => lines.push(s);
w("// tests/sentencepiece_fixture.hpp — llama.cpp's own tokenization of a set of");
w("// texts on the shared tokenizers as GGUF vocabularies. Generated (do not edit) by");
w("// scripts/record_sentencepiece_fixture.sh: llama.cpp from the npm package");
w("// node-llama-cpp 3.21.1, on GGUF files that the peer's llama2c_to_gguf.py");
w("// wrote with tok512.bin and llama2_tokenizer.bin (tokenizer.ggml.model");
w("// \"llama\", add_bos_token true, no add_space_prefix key: llama.cpp's default");
w("// true). `ids`: model.tokenize(text, false) = common_tokenize(text,");
w("// add_special = false, parse_special = false), so no BOS. `text_back`:");
w("// model.detokenize(ids, false) = llama_detokenize(ids, remove_special =");
w("// false, unparse_special = false); `text_back_bos`: the same of BOS + ids.");
w("#pragma once");
w("");
w("namespace kvcache_test {");
w("");
w("struct SpmCase {");
w("  const char* text;");
w("  const char* ids;            // space-separated, no BOS");
w("  const char* text_back;      // llama_detokenize(ids)");
w("  const char* text_back_bos;  // llama_detokenize(BOS, ids)");
w("};");
for (const [name, file] of [["kTok512Cases", tok512Path], ["kLlama2Cases", llama2Path]]) {
    const model = await llama.loadModel({modelPath: file, vocabOnly: true});
    const bos = model.tokens.bos;
    w("");
    w(`// ${path.basename(file)}`);
    w(`inline const SpmCase ${name}[] = {`);
    for (const text of TEXTS) {
        const ids = model.tokenize(text, false);
        const back = ids.length ? model.detokenize(ids, false) : "";
        const backBos = model.detokenize([bos, ...ids], false);
        w(`    {${cpp(text)}, "${ids.join(" ")}", ${cpp(back)}, ${cpp(backBos)}},`);
    }
    w("};");
    await model.dispose();
}
w("");
w("}  // namespace kvcache_test");
process.stdout.write(lines.join("\n") + "\n");
