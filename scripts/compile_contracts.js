#!/usr/bin/env node
// Compile contracts/*.sol with the pinned solc-js and write contracts/build/<Name>.json
// (abi, bytecode, compiler version, source digest), keys sorted, so the same sources
// give byte-identical artefacts on every machine.
//
//   node scripts/compile_contracts.js            write contracts/build/
//   node scripts/compile_contracts.js --check    exit 1 if contracts/build/ is stale
//   node scripts/compile_contracts.js --out DIR  write to DIR instead
"use strict";

const crypto = require("crypto");
const fs = require("fs");
const path = require("path");
const solc = require("solc");

const ROOT = path.resolve(__dirname, "..");
const SOURCES = path.join(ROOT, "contracts");
const BUILD = path.join(SOURCES, "build");

// Fixed settings: changing any of them changes every artefact.
const SETTINGS = {
  evmVersion: "cancun",
  optimizer: { enabled: true, runs: 200 },
  metadata: { bytecodeHash: "none" },
  outputSelection: { "*": { "*": ["abi", "evm.bytecode.object"] } },
};

function sortKeys(value) {
  if (Array.isArray(value)) return value.map(sortKeys);
  if (value && typeof value === "object") {
    return Object.fromEntries(
      Object.keys(value)
        .sort()
        .map((k) => [k, sortKeys(value[k])]),
    );
  }
  return value;
}

function compile() {
  const files = fs.readdirSync(SOURCES).filter((f) => f.endsWith(".sol")).sort();
  const sources = {};
  for (const file of files) {
    sources[file] = { content: fs.readFileSync(path.join(SOURCES, file), "utf8") };
  }
  const input = { language: "Solidity", sources, settings: SETTINGS };
  const output = JSON.parse(solc.compile(JSON.stringify(input)));
  const errors = (output.errors || []).filter((e) => e.severity === "error");
  for (const e of output.errors || []) process.stderr.write(e.formattedMessage + "\n");
  if (errors.length) process.exit(2);

  const artefacts = {};
  for (const file of files) {
    const digest = crypto.createHash("sha256").update(sources[file].content).digest("hex");
    for (const [name, contract] of Object.entries(output.contracts[file] || {})) {
      const bytecode = contract.evm.bytecode.object;
      if (!bytecode) continue; // interfaces and abstract contracts are not deployed
      const artefact = {
        contractName: name,
        source: `contracts/${file}`,
        sourceSha256: digest,
        compiler: `solc-js ${solc.version()}`,
        settings: { evmVersion: SETTINGS.evmVersion, optimizer: SETTINGS.optimizer },
        abi: contract.abi,
        bytecode: "0x" + bytecode,
      };
      artefacts[`${name}.json`] = JSON.stringify(sortKeys(artefact), null, 2) + "\n";
    }
  }
  return artefacts;
}

function main(argv) {
  const artefacts = compile();
  if (argv.includes("--check")) {
    const stale = Object.keys(artefacts).filter((name) => {
      const file = path.join(BUILD, name);
      return !fs.existsSync(file) || fs.readFileSync(file, "utf8") !== artefacts[name];
    });
    if (stale.length) {
      process.stderr.write(`stale artefacts in contracts/build: ${stale.join(", ")}; run npm run compile\n`);
      process.exit(1);
    }
    return;
  }
  const outIndex = argv.indexOf("--out");
  const out = outIndex >= 0 ? path.resolve(argv[outIndex + 1]) : BUILD;
  fs.mkdirSync(out, { recursive: true });
  for (const [name, text] of Object.entries(artefacts)) {
    fs.writeFileSync(path.join(out, name), text);
    process.stdout.write(`wrote ${path.relative(process.cwd(), path.join(out, name))}\n`);
  }
}

main(process.argv.slice(2));
