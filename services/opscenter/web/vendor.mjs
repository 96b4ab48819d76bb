// Copies the dashboard's third-party files from node_modules/ into ../static/vendor/ (run: npm run vendor).
import { copyFileSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "..", "static", "vendor");

const FILES = {
  leaflet: {
    "dist/leaflet.js": "leaflet.js",
    "dist/leaflet.css": "leaflet.css",
    LICENSE: "LICENSE.leaflet",
  },
  uplot: {
    "dist/uPlot.iife.min.js": "uPlot.iife.min.js",
    "dist/uPlot.min.css": "uPlot.min.css",
    LICENSE: "LICENSE.uplot",
  },
};

rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });
const versions = {};
for (const [pkg, files] of Object.entries(FILES)) {
  const root = join(here, "node_modules", pkg);
  versions[pkg] = JSON.parse(readFileSync(join(root, "package.json"), "utf8")).version;
  for (const [from, to] of Object.entries(files)) {
    copyFileSync(join(root, from), join(out, to));
    console.log(`${pkg}@${versions[pkg]} ${from} -> static/vendor/${to}`);
  }
}
// what is vendored, for people reading the tree
const lines = Object.entries(versions).map(([p, v]) => `${p} ${v}`);
writeFileSync(join(out, "VERSIONS"), `${lines.join("\n")}\n`);
