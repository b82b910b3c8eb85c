// Checks Argo Rollouts objects (JSON on stdin: an array) against Argo Rollouts' API as the
// npm package @kubernetes-models/argo-rollouts (pinned in package-lock.json beside this file)
// publishes it: its generated validators check types, enums and required fields; the field
// names of every Argo type, read from its generated declarations, make the check strict
// (an unknown field is an error, as `kubectl apply --validate=strict` makes it). Pod
// templates inside are Kubernetes types: check.py validates them with kubernetes-validate.
//
// Usage: node argo-check.mjs MODELS_DIR < objects.json   (MODELS_DIR holds node_modules/)
import { readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const dir = process.argv[2];
if (!dir) {
  console.error("usage: node argo-check.mjs MODELS_DIR < objects.json");
  process.exit(2);
}
const pkg = join(dir, "node_modules/@kubernetes-models/argo-rollouts/argoproj.io/v1alpha1");

// Interface name -> (field -> declared type), and the long names the package aliases.
const interfaces = new Map();
const aliases = new Map();
for (const file of readdirSync(pkg).filter((f) => f.endsWith(".d.ts"))) {
  const text = readFileSync(join(pkg, file), "utf8");
  for (const m of text.matchAll(/export interface (\w+)(?: extends [\w, ]+)? \{([\s\S]*?)\n\}/g)) {
    const fields = new Map();
    for (const f of m[2].matchAll(/^\s*"([^"]+)"\??: (.+);$/gm)) fields.set(f[1], f[2]);
    interfaces.set(m[1], fields);
  }
  for (const m of text.matchAll(/export type \{ (\w+) as (\w+),/g)) aliases.set(m[2], m[1]);
}
// A package whose layout changed must not make every object pass.
for (const name of ["IRollout", "IRolloutSpec", "ICanaryStrategy", "IBlueGreenStrategy", "ICanaryStep"]) {
  if ((interfaces.get(name)?.size ?? 0) < 2) {
    console.error(`argo-check: cannot read ${name} from ${pkg}`);
    process.exit(2);
  }
}

function unknownFields(value, type, path, errors) {
  const array = type.match(/^Array<(.+)>$/);
  if (array) {
    if (Array.isArray(value)) value.forEach((v, i) => unknownFields(v, array[1], `${path}[${i}]`, errors));
    return;
  }
  const name = aliases.get(type) ?? type;
  const fields = interfaces.get(name);
  // Not an Argo type (a Kubernetes one, a scalar, a map): checked elsewhere.
  if (!fields || value === null || typeof value !== "object" || Array.isArray(value)) return;
  for (const [key, v] of Object.entries(value)) {
    if (!fields.has(key)) errors.push(`${path}.${key}: not a field of ${name}`);
    else unknownFields(v, fields.get(key), `${path}.${key}`, errors);
  }
}

const objects = JSON.parse(readFileSync(0, "utf8"));
let failed = 0;
for (const obj of objects) {
  const what = `${obj.kind}/${obj.metadata?.name}`;
  const errors = [];
  if (obj.apiVersion !== "argoproj.io/v1alpha1" || !interfaces.has(`I${obj.kind}`)) {
    errors.push(`not an Argo Rollouts kind: ${obj.apiVersion} ${obj.kind}`);
  } else {
    unknownFields(obj, `I${obj.kind}`, "", errors);
    const module = await import(pathToFileURL(join(pkg, `${obj.kind}.js`)).href);
    try {
      new module[obj.kind](obj).validate();
    } catch (e) {
      errors.push(String(e.message ?? e));
    }
  }
  if (errors.length) {
    failed++;
    for (const e of errors) console.log(`ERROR ${what}: ${e}`);
  } else {
    console.log(`ok ${what} (Argo Rollouts API, strict)`);
  }
}
process.exit(failed ? 1 : 0);
